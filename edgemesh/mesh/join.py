"""Admission of new nodes: both sides prove they know the cluster secret; it never travels.

Server side (`JoinService`) is transport-free so it can be tested with a fake clock. The flow
and the MAC inputs are specified in protocols/wire.md ("Join handshake").
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import msgpack

from edgemesh.clock import Clock
from edgemesh.errors import AuthError, ProtocolError
from edgemesh.identity.keys import NodeKey
from edgemesh.identity.statedir import ClusterInfo
from edgemesh.identity.token import describe_expiry, token_secret
from edgemesh.mesh.records import MemberRecord, admit, check_self
from edgemesh.mesh.view import MembershipView
from edgemesh.wire.schema import body_map, need

log = logging.getLogger(__name__)

NONCE_BYTES = 32
NONCE_TTL = 30.0
MAX_OPEN_CHALLENGES = 1024
SERVER_TAG = b"edgemesh-join-server"
CLIENT_TAG = b"edgemesh-join-v1"


def server_proof(secret: bytes, cnonce: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, SERVER_TAG + cnonce + nonce, hashlib.sha256).digest()


def client_mac(secret: bytes, cluster_id: str, nonce: bytes, record: bytes) -> bytes:
    return hmac.new(secret, CLIENT_TAG + cluster_id.encode() + nonce + record, hashlib.sha256).digest()


def pack_record(r: MemberRecord) -> bytes:
    return msgpack.packb(r.to_wire(), use_bin_type=True)


@dataclass
class _Challenge:
    peer_key: bytes
    expires: float
    join_secret: bytes  # of the token the joiner holds (its expiry names it)


class JoinService:
    """Answers join.challenge / join.register for one member."""

    def __init__(
        self,
        cluster: ClusterInfo,
        key: NodeKey,
        view: MembershipView,
        clock: Clock,
        on_admit: Callable[[MemberRecord], None],
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.cluster = cluster
        self.key = key
        self.view = view
        self.clock = clock
        self.on_admit = on_admit
        self.wall = wall  # token expiries are wall-clock times
        self._open: OrderedDict[bytes, _Challenge] = OrderedDict()
        self.refused = 0

    def challenge(self, peer_key: bytes, body: Any) -> dict[str, Any]:
        body = body_map(body)
        cnonce = need(body, "cnonce", bytes)
        if len(cnonce) != NONCE_BYTES:
            raise ProtocolError("cnonce must be 32 bytes")
        join_secret = self._token_secret(body)
        self._expire()
        nonce = secrets.token_bytes(NONCE_BYTES)
        self._open[nonce] = _Challenge(peer_key, self.clock.now() + NONCE_TTL, join_secret)
        while len(self._open) > MAX_OPEN_CHALLENGES:
            self._open.popitem(last=False)
        return {"nonce": nonce, "cluster": self.cluster.cluster_id,
                "proof": server_proof(join_secret, cnonce, nonce)}

    def _token_secret(self, body: dict[str, Any]) -> bytes:
        """The joiner's token expires at ``exp``; its secret derives from the current cluster
        secret, so an expired token, one made before a rotation, or a forged expiry fails."""
        if self.view.removal(self.key.node_id) is not None:
            self._refuse("join refused: this member was removed from the cluster and admits no one; "
                         "use a token from another member")
        expires = need(body, "exp", int)
        if expires <= self.wall():
            self._refuse(f"join refused: the token expired at {describe_expiry(expires)}; "
                         "get a new one with `edgemesh token` on a member")
        return token_secret(self.cluster.secret, self.cluster.cluster_id, expires)

    def register(self, peer_key: bytes, body: Any) -> dict[str, Any]:
        body = body_map(body)
        nonce = need(body, "nonce", bytes)
        packed = need(body, "record", bytes, max_len=64 * 1024)
        mac = need(body, "mac", bytes)
        self._expire()
        # Single use: the challenge is gone after the first attempt, successful or not.
        challenge = self._open.pop(nonce, None)
        if challenge is None:
            self._refuse("join refused: challenge unknown, expired or already used (replayed join?)")
        if challenge.peer_key != peer_key:
            self._refuse("join refused: the challenge was issued to a different key")
        want = client_mac(challenge.join_secret, self.cluster.cluster_id, nonce, packed)
        if not hmac.compare_digest(want, mac):
            self._refuse("join refused: the token does not match this cluster's secret (is it from this cluster, "
                         "or from before the secret was rotated?)")
        try:
            record = MemberRecord.from_wire(msgpack.unpackb(packed, raw=False, strict_map_key=True))
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            raise ProtocolError("join record is not valid msgpack") from None
        if record.curve_key != peer_key:
            self._refuse("join refused: the record's key is not the key of this connection")
        if record.status != "member":
            raise ProtocolError("a joining record must have status 'member'")
        check_self(self.cluster.cluster_id, record)
        if self.view.removal(record.node_id) is not None:
            self._refuse("join refused: this device's key was removed from the cluster (or left it); "
                         "it can join again only with a new key (another --state-dir)")
        admitted = admit(self.cluster.cluster_id, self.key, record, self.view.epoch)
        self.view.merge([admitted])
        if self.view.get(record.node_id) != admitted:
            self._refuse("join refused: a newer record for this node exists; retry")
        log.info("admitted %s (%s)", record.node_id, record.name)
        self.on_admit(admitted)
        # The cluster secret goes only to a node just admitted, inside the encrypted link.
        return {"cluster": self.cluster.cluster_id, "root": self.cluster.root, "records": self.view.to_wire(),
                "removals": self.view.removals_wire(), "secret": self.cluster.secret,
                "secret_epoch": self.cluster.secret_epoch, "rotated_by": self.cluster.rotated_by,
                "rotation_sig": self.cluster.rotation_sig}

    def _refuse(self, message: str) -> Any:
        self.refused += 1
        log.warning("%s", message)
        raise AuthError(message)

    def _expire(self) -> None:
        now = self.clock.now()
        for nonce in [n for n, c in self._open.items() if c.expires < now]:
            del self._open[nonce]
