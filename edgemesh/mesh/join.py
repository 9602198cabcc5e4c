"""Admission of new nodes: both sides prove they know the cluster secret; it never travels.

Server side (`JoinService`) is transport-free so it can be tested with a fake clock. The flow
and the MAC inputs are specified in protocols/wire.md ("Join handshake"); the proofs are bound
to the link (both CURVE keys, the cluster id, both nonces — `mesh.join_proof`), and the reply
is signed by this member's node key, so a join cannot be relayed through someone else.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import msgpack

from edgemesh.clock import Clock
from edgemesh.errors import AuthError, ProtocolError
from edgemesh.identity.keys import NodeKey
from edgemesh.identity.statedir import ClusterInfo
from edgemesh.mesh.join_proof import JoinChannel, client_mac, server_proof, sign_reply
from edgemesh.mesh.records import MemberRecord, admit, check_self
from edgemesh.mesh.view import MembershipView
from edgemesh.wire.schema import body_map, need

log = logging.getLogger(__name__)

NONCE_BYTES = 32
NONCE_TTL = 30.0
MAX_OPEN_CHALLENGES = 1024
# Open challenges one source address may hold: a stranger asking for challenges in a loop only
# evicts its own, and when all are taken the source holding the most gives one up.
MAX_CHALLENGES_PER_SOURCE = 16
__all__ = ["JoinService", "JoinChannel", "client_mac", "server_proof", "pack_record", "NONCE_BYTES"]


def pack_record(r: MemberRecord) -> bytes:
    return msgpack.packb(r.to_wire(), use_bin_type=True)


@dataclass
class _Challenge:
    peer_key: bytes
    cnonce: bytes
    expires: float
    source: str


class JoinService:
    """Answers join.challenge / join.register for one member."""

    def __init__(
        self,
        cluster: ClusterInfo,
        key: NodeKey,
        view: MembershipView,
        clock: Clock,
        on_admit: Callable[[MemberRecord], None],
    ) -> None:
        self.cluster = cluster
        self.key = key
        self.view = view
        self.clock = clock
        self.on_admit = on_admit
        self._open: OrderedDict[bytes, _Challenge] = OrderedDict()
        self._per_source: dict[str, int] = {}
        self.refused = 0

    def challenge(self, peer_key: bytes, body: Any, source: str = "") -> dict[str, Any]:
        """``source``: the caller's address where the transport knows it (shares are per source)."""
        body = body_map(body)
        cnonce = need(body, "cnonce", bytes)
        if len(cnonce) != NONCE_BYTES:
            raise ProtocolError("cnonce must be 32 bytes")
        self._expire()
        if self._per_source.get(source, 0) >= MAX_CHALLENGES_PER_SOURCE:
            self._drop_oldest_of(source)
        nonce = secrets.token_bytes(NONCE_BYTES)
        self._open[nonce] = _Challenge(peer_key, cnonce, self.clock.now() + NONCE_TTL, source)
        self._per_source[source] = self._per_source.get(source, 0) + 1
        while len(self._open) > MAX_OPEN_CHALLENGES:
            self._drop_oldest_of(max(self._per_source, key=self._per_source.__getitem__))
        return {"nonce": nonce, "cluster": self.cluster.cluster_id,
                "proof": server_proof(self.cluster.secret, self._channel(peer_key, cnonce, nonce))}

    def _channel(self, peer_key: bytes, cnonce: bytes, nonce: bytes) -> JoinChannel:
        return JoinChannel(self.cluster.cluster_id, self.key.curve_public, peer_key, cnonce, nonce)

    def register(self, peer_key: bytes, body: Any) -> dict[str, Any]:
        body = body_map(body)
        nonce = need(body, "nonce", bytes)
        packed = need(body, "record", bytes, max_len=64 * 1024)
        mac = need(body, "mac", bytes)
        self._expire()
        # Single use: the challenge is gone after the first attempt, successful or not.
        challenge = self._take(nonce)
        if challenge is None:
            self._refuse("join refused: challenge unknown, expired or already used (replayed join?)")
        if challenge.peer_key != peer_key:
            self._refuse("join refused: the challenge was issued to a different key")
        channel = self._channel(peer_key, challenge.cnonce, nonce)
        want = client_mac(self.cluster.secret, channel, packed)
        if not hmac.compare_digest(want, mac):
            self._refuse("join refused: wrong cluster secret (is the token from this cluster?), "
                         "or the join was relayed through another node")
        try:
            record = MemberRecord.from_wire(msgpack.unpackb(packed, raw=False, strict_map_key=True))
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            raise ProtocolError("join record is not valid msgpack") from None
        if record.curve_key != peer_key:
            self._refuse("join refused: the record's key is not the key of this connection")
        if record.status != "member":
            raise ProtocolError("a joining record must have status 'member'")
        check_self(self.cluster.cluster_id, record)
        admitted = admit(self.cluster.cluster_id, self.key, record)
        self.view.merge([admitted])
        if self.view.get(record.node_id) != admitted:
            self._refuse("join refused: a newer record for this node exists; retry")
        log.info("admitted %s (%s)", record.node_id, record.name)
        self.on_admit(admitted)
        records = self.view.to_wire()
        return {"cluster": self.cluster.cluster_id, "root": self.cluster.root, "records": records,
                "sig": sign_reply(self.key, channel, self.cluster.root, records)}

    def _refuse(self, message: str) -> Any:
        self.refused += 1
        log.warning("%s", message)
        raise AuthError(message)

    def _take(self, nonce: bytes) -> _Challenge | None:
        challenge = self._open.pop(nonce, None)
        if challenge is not None:
            left = self._per_source[challenge.source] - 1
            if left:
                self._per_source[challenge.source] = left
            else:
                del self._per_source[challenge.source]
        return challenge

    def _drop_oldest_of(self, source: str) -> None:
        for nonce, c in self._open.items():
            if c.source == source:
                self._take(nonce)
                return

    def _expire(self) -> None:
        now = self.clock.now()
        for nonce in [n for n, c in self._open.items() if c.expires < now]:
            self._take(nonce)
