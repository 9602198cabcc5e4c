"""Revocation data the cluster replicates beside member records: removals and secret rotations.

A ``Removal`` (tombstone) says "node X is no longer a member, from epoch E on". It is signed by
the member that issued it (``edgemesh remove``) or by X itself (``edgemesh leave``). It is
permanent: no later version of X's own record brings X back, and admissions X signs in epoch E
or later are void. A ``SecretRotation`` carries a new cluster secret and the epoch it starts;
it travels only inside member-to-member links (CURVE-encrypted) and is never written to the
world-readable view cache.

The *member epoch* is a cluster-wide counter: the highest epoch of any removal or rotation a
node has seen. Each removal or rotation is issued at that counter + 1, and each admission
records the epoch it was made in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import msgpack

from edgemesh.errors import AuthError, ProtocolError
from edgemesh.identity.keys import NodeKey, verify
from edgemesh.identity.token import SECRET_BYTES
from edgemesh.wire.schema import need

MAX_EPOCH = 2**62  # bounds a forged epoch so counters stay msgpack-encodable


def _epoch(obj: dict[str, Any], key: str) -> int:
    e = need(obj, key, int)
    if not 0 < e < MAX_EPOCH:
        raise ProtocolError(f"field '{key}' must be an epoch in 1..2^62")
    return e


@dataclass(frozen=True)
class Removal:
    node_id: str  # who is removed
    epoch: int  # from when on (its admissions in this epoch or later are void)
    by: str  # node id of the signer (== node_id for a node that left)
    sig: bytes = b""

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.node_id, "e": self.epoch, "by": self.by, "sig": self.sig}

    @classmethod
    def from_wire(cls, obj: Any) -> Removal:
        if not isinstance(obj, dict):
            raise ProtocolError("a removal must be a map")
        return cls(node_id=need(obj, "id", str, max_len=64), epoch=_epoch(obj, "e"),
                   by=need(obj, "by", str, max_len=64), sig=need(obj, "sig", bytes, max_len=64))

    def order(self) -> tuple[int, str, bytes]:
        """Of two removals of one node, the smaller is kept (the earliest cut-off wins)."""
        return (self.epoch, self.by, self.sig)


def removal_message(cluster_id: str, node_id: str, epoch: int, by: str) -> bytes:
    return msgpack.packb(["edgemesh-remove-v1", cluster_id, node_id, epoch, by], use_bin_type=True)


def sign_removal(cluster_id: str, signer: NodeKey, node_id: str, epoch: int) -> Removal:
    return Removal(node_id, epoch, signer.node_id, signer.sign(removal_message(cluster_id, node_id, epoch, signer.node_id)))


def check_removal(cluster_id: str, r: Removal, signer_key: bytes) -> None:
    try:
        verify(signer_key, removal_message(cluster_id, r.node_id, r.epoch, r.by), r.sig)
    except AuthError:
        raise AuthError(f"removal of {r.node_id} by {r.by}: bad signature") from None


@dataclass(frozen=True)
class SecretRotation:
    secret: bytes
    epoch: int
    by: str
    sig: bytes = b""

    def to_wire(self) -> dict[str, Any]:
        return {"s": self.secret, "e": self.epoch, "by": self.by, "sig": self.sig}

    @classmethod
    def from_wire(cls, obj: Any) -> SecretRotation:
        if not isinstance(obj, dict):
            raise ProtocolError("a secret rotation must be a map")
        secret = need(obj, "s", bytes)
        if len(secret) != SECRET_BYTES:
            raise ProtocolError(f"a cluster secret is {SECRET_BYTES} bytes")
        return cls(secret=secret, epoch=_epoch(obj, "e"), by=need(obj, "by", str, max_len=64),
                   sig=need(obj, "sig", bytes, max_len=64))

    def order(self) -> tuple[int, bytes]:
        """Newer epoch wins; two rotations in one epoch (issued at once) are ordered by digest,
        so every member keeps the same one."""
        return (self.epoch, hashlib.sha256(self.secret).digest())


def rotation_message(cluster_id: str, secret: bytes, epoch: int, by: str) -> bytes:
    return msgpack.packb(["edgemesh-rotate-v1", cluster_id, hashlib.sha256(secret).digest(), epoch, by],
                         use_bin_type=True)


def sign_rotation(cluster_id: str, signer: NodeKey, secret: bytes, epoch: int) -> SecretRotation:
    return SecretRotation(secret, epoch, signer.node_id,
                          signer.sign(rotation_message(cluster_id, secret, epoch, signer.node_id)))


def check_rotation(cluster_id: str, r: SecretRotation, signer_key: bytes) -> None:
    try:
        verify(signer_key, rotation_message(cluster_id, r.secret, r.epoch, r.by), r.sig)
    except AuthError:
        raise AuthError(f"secret rotation by {r.by}: bad signature") from None
