"""Admission of new nodes: both sides prove they know the token's join secret; it never travels.

The join secret is derived from the cluster secret and the token's expiry (`identity.token`),
so the member recomputes it from the expiry the joiner names. Server side (`JoinService`) is
transport-free so it can be tested with a fake clock. The flow and the MAC inputs are specified
in protocols/wire.md ("Join handshake"); the proofs are bound to the link (both CURVE keys, the
cluster id, both nonces — `mesh.join_proof`), and the reply — the view, the removals and the
cluster secret, sent only to a node just admitted — is signed by this member's node key, so a
join cannot be relayed through someone else.
"""

from __future__ import annotations

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
from edgemesh.mesh.join_proof import JoinChannel, JoinReply, client_mac, server_proof, sign_reply
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
    token_expires: int  # the expiry the joiner named (its token's)
    join_secret: bytes  # of the token the joiner holds, from the cluster secret at challenge time


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
        self._per_source: dict[str, int] = {}
        self.refused = 0

    def challenge(self, peer_key: bytes, body: Any, source: str = "") -> dict[str, Any]:
        """``source``: the caller's address where the transport knows it (shares are per source)."""
        body = body_map(body)
        cnonce = need(body, "cnonce", bytes)
        if len(cnonce) != NONCE_BYTES:
            raise ProtocolError("cnonce must be 32 bytes")
        token_expires, join_secret = self._token_secret(body)
        self._expire()
        if self._per_source.get(source, 0) >= MAX_CHALLENGES_PER_SOURCE:
            self._drop_oldest_of(source)
        nonce = secrets.token_bytes(NONCE_BYTES)
        self._open[nonce] = _Challenge(peer_key, cnonce, self.clock.now() + NONCE_TTL, source, token_expires,
                                       join_secret)
        self._per_source[source] = self._per_source.get(source, 0) + 1
        while len(self._open) > MAX_OPEN_CHALLENGES:
            self._drop_oldest_of(max(self._per_source, key=self._per_source.__getitem__))
        return {"nonce": nonce, "cluster": self.cluster.cluster_id,
                "proof": server_proof(join_secret, self._channel(peer_key, cnonce, nonce))}

    def _channel(self, peer_key: bytes, cnonce: bytes, nonce: bytes) -> JoinChannel:
        return JoinChannel(self.cluster.cluster_id, self.key.curve_public, peer_key, cnonce, nonce)

    def _token_secret(self, body: dict[str, Any]) -> tuple[int, bytes]:
        """The joiner's token expires at ``exp``; its secret derives from the current cluster
        secret, so an expired token, one made before a rotation, or a forged expiry fails."""
        if self.view.removal(self.key.node_id) is not None:
            self._refuse("join refused: this member was removed from the cluster and admits no one; "
                         "use a token from another member")
        expires = need(body, "exp", int)
        if expires <= self.wall():
            self._refuse(f"join refused: the token expired at {describe_expiry(expires)}; "
                         "get a new one with `edgemesh token` on a member")
        return expires, token_secret(self.cluster.secret, self.cluster.cluster_id, expires)

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
        want = client_mac(challenge.join_secret, channel, packed)
        if not hmac.compare_digest(want, mac):
            self._refuse("join refused: the token does not match this cluster's secret (is it from this cluster, "
                         "or from before the secret was rotated?), or the join was relayed through another node")
        # A rotation that arrived since the challenge ends this token too; admitting now would hand
        # the joiner a secret its token does not derive from (and the joiner would refuse it).
        if not hmac.compare_digest(challenge.join_secret, token_secret(
                self.cluster.secret, self.cluster.cluster_id, challenge.token_expires)):
            self._refuse("join refused: the cluster secret was rotated during this join, so the token no longer "
                         "admits anyone; get a new one with `edgemesh token` on a member")
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
        # The cluster secret goes only to a node just admitted, inside the encrypted link; the
        # signature covers it with the view and the removals, so no one on another link can swap them.
        reply = JoinReply(self.cluster.root, self.view.to_wire(), self.view.removals_wire(), self.cluster.secret,
                          self.cluster.secret_epoch, self.cluster.rotated_by, self.cluster.rotation_sig)
        return {"cluster": self.cluster.cluster_id, **reply.to_wire(), "sig": sign_reply(self.key, channel, reply)}

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
