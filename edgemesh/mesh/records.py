"""Member records: what the cluster replicates about each node, signed by the node itself.

A record carries two signatures: the *admission* (by the member that checked the joiner's
knowledge of the cluster secret, or self-signed by the cluster's root, over the member epoch it
was made in) and the node's own
signature over its current addresses, profile and status. Only the node can publish a newer
version of itself, so a member cannot redirect traffic for another member.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

from edgemesh.errors import AuthError, ProtocolError
from edgemesh.identity.keys import NodeKey, curve_public_for, node_id_for, verify
from edgemesh.wire.schema import maybe, need

STATUSES = ("member", "left")
MAX_ADDRESSES = 16


@dataclass(frozen=True)
class MemberRecord:
    node_id: str
    name: str
    key: bytes  # ed25519 public key
    version: int  # set by the node itself; newer wins
    status: str
    addresses: tuple[str, ...]  # mesh endpoints
    join: tuple[str, ...]  # join endpoints
    profile: dict[str, Any] = field(default_factory=dict)
    admitted_by: str = ""
    admission_sig: bytes = b""
    sig: bytes = b""
    admission_epoch: int = 0  # the member epoch the admission was signed in (mesh.revocation)

    @property
    def curve_key(self) -> bytes:
        return curve_public_for(self.key)

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.node_id, "name": self.name, "key": self.key, "v": self.version,
            "status": self.status, "addr": list(self.addresses), "join": list(self.join),
            "profile": self.profile, "by": self.admitted_by, "asig": self.admission_sig, "sig": self.sig,
            "ae": self.admission_epoch,
        }

    @classmethod
    def from_wire(cls, obj: Any) -> MemberRecord:
        if not isinstance(obj, dict):
            raise ProtocolError("member record must be a map")
        addresses = need(obj, "addr", list, max_len=MAX_ADDRESSES)
        join = need(obj, "join", list, max_len=MAX_ADDRESSES)
        if not all(isinstance(a, str) and len(a) < 256 for a in addresses + join):
            raise ProtocolError("addresses must be short strings")
        status = need(obj, "status", str)
        if status not in STATUSES:
            raise ProtocolError(f"unknown member status {status!r}")
        key = need(obj, "key", bytes)
        if len(key) != 32:
            raise ProtocolError("member key must be 32 bytes")
        return cls(
            node_id=need(obj, "id", str, max_len=64),
            name=need(obj, "name", str, max_len=128),
            key=key,
            version=need(obj, "v", int),
            status=status,
            addresses=tuple(addresses),
            join=tuple(join),
            profile=need(obj, "profile", dict),
            admitted_by=need(obj, "by", str, max_len=64),
            admission_sig=need(obj, "asig", bytes, max_len=64),
            sig=need(obj, "sig", bytes, max_len=64),
            admission_epoch=_admission_epoch(obj),
        )


def _admission_epoch(obj: dict[str, Any]) -> int:
    epoch = maybe(obj, "ae", int, 0)  # absent in records made before epochs existed
    if not 0 <= epoch < 2**62:
        raise ProtocolError("admission epoch out of range")
    return epoch


def admission_message(cluster_id: str, node_id: str, key: bytes, epoch: int = 0) -> bytes:
    # Epoch 0 keeps the v1 message, so admissions signed before epochs existed still verify.
    if epoch == 0:
        return msgpack.packb(["edgemesh-admit-v1", cluster_id, node_id, key], use_bin_type=True)
    return msgpack.packb(["edgemesh-admit-v2", cluster_id, node_id, key, epoch], use_bin_type=True)


def self_message(cluster_id: str, r: MemberRecord) -> bytes:
    return msgpack.packb(
        ["edgemesh-record-v1", cluster_id, r.node_id, r.name, r.version, r.status,
         list(r.addresses), list(r.join), r.profile],
        use_bin_type=True,
    )


def sign_self(cluster_id: str, key: NodeKey, r: MemberRecord) -> MemberRecord:
    return replace(r, sig=key.sign(self_message(cluster_id, r)))


def admit(cluster_id: str, admitter: NodeKey, r: MemberRecord, epoch: int = 0) -> MemberRecord:
    return replace(r, admitted_by=admitter.node_id, admission_epoch=epoch,
                   admission_sig=admitter.sign(admission_message(cluster_id, r.node_id, r.key, epoch)))


def check_self(cluster_id: str, r: MemberRecord) -> None:
    """The record is internally consistent and signed by the key it names."""
    if node_id_for(r.key) != r.node_id:
        raise AuthError(f"record {r.node_id}: node id does not match its key")
    try:
        verify(r.key, self_message(cluster_id, r), r.sig)
    except AuthError:
        raise AuthError(f"record {r.node_id}: bad self-signature") from None
    except (TypeError, ValueError):  # profile not serializable: forged or corrupt
        raise AuthError(f"record {r.node_id}: unsignable content") from None
