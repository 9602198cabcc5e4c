"""What both sides of a join prove, and to whom: the MACs and the signed reply, bound to the link.

Every proof covers one *channel transcript*: the cluster id, the server's CURVE key as the
client dialled it, the client's CURVE key as the server's link authenticated it, and both
nonces. Someone who relays a join (an impostor announcing itself on the LAN, dialled with its
own key, who opens its own link to a real member) sits between two links with different key
pairs, so nothing a member says on one link verifies on the other. The secret both MACs are keyed with
is the token's join secret (derived from the cluster secret and the token's expiry), never the
cluster secret itself. The wire format is in protocols/wire.md ("Join handshake").
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

import msgpack

from edgemesh.errors import AuthError, ProtocolError
from edgemesh.identity.keys import NodeKey, verify
from edgemesh.identity.token import SECRET_BYTES
from edgemesh.mesh.revocation import MAX_EPOCH
from edgemesh.wire.schema import need

TRANSCRIPT_TAG = "edgemesh-join-v2"
SERVER_TAG = b"edgemesh-join-server-v2"
CLIENT_TAG = b"edgemesh-join-client-v2"
REPLY_TAG = "edgemesh-join-reply-v3"  # v3: the reply also carries removals and the cluster secret
MAX_ROOT_LEN = 64  # a node id (hex of 32 bytes)


@dataclass(frozen=True)
class JoinChannel:
    """The facts both ends of one join link agree on when nobody sits in between."""

    cluster_id: str
    server_key: bytes  # z85 CURVE public key of the member serving the join port
    client_key: bytes  # z85 CURVE public key of the joiner
    cnonce: bytes
    nonce: bytes

    def transcript(self) -> bytes:
        return msgpack.packb([TRANSCRIPT_TAG, self.cluster_id, self.server_key, self.client_key,
                              self.cnonce, self.nonce], use_bin_type=True)


def server_proof(secret: bytes, channel: JoinChannel) -> bytes:
    """The member's answer to the challenge: it knows the secret, on this very link."""
    return hmac.new(secret, SERVER_TAG + channel.transcript(), hashlib.sha256).digest()


def client_mac(secret: bytes, channel: JoinChannel, record: bytes) -> bytes:
    """The joiner's proof of the secret over the record it asks to have admitted."""
    return hmac.new(secret, CLIENT_TAG + channel.transcript() + record, hashlib.sha256).digest()


@dataclass(frozen=True)
class JoinReply:
    """What a member hands a node it just admitted: the view (records under ``root`` and the
    removals) and the cluster secret with the signed rotation that set it (epoch 0, ``rotated_by``
    empty: the secret the cluster was created with)."""

    root: str
    records: list[Any]
    removals: list[Any]
    secret: bytes
    secret_epoch: int = 0
    rotated_by: str = ""
    rotation_sig: bytes = b""

    def to_wire(self) -> dict[str, Any]:
        return {"root": self.root, "records": self.records, "removals": self.removals, "secret": self.secret,
                "secret_epoch": self.secret_epoch, "rotated_by": self.rotated_by, "rotation_sig": self.rotation_sig}

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> JoinReply:
        """Types and sizes only; whether it is true is ``check_reply``'s and the view's business."""
        secret = need(body, "secret", bytes)
        if len(secret) != SECRET_BYTES:
            raise ProtocolError("the cluster secret in the join reply has the wrong length")
        epoch = need(body, "secret_epoch", int)
        if not 0 <= epoch < MAX_EPOCH:
            raise ProtocolError("field 'secret_epoch' must be in 0..2^62")
        return cls(root=need(body, "root", str, max_len=MAX_ROOT_LEN), records=need(body, "records", list),
                   removals=need(body, "removals", list), secret=secret, secret_epoch=epoch,
                   rotated_by=need(body, "rotated_by", str, max_len=MAX_ROOT_LEN),
                   rotation_sig=need(body, "rotation_sig", bytes, max_len=64))


def _digest(obj: Any) -> bytes:
    return hashlib.sha256(msgpack.packb(obj, use_bin_type=True)).digest()


def reply_message(channel: JoinChannel, reply: JoinReply) -> bytes:
    """What the member signs when it answers a register, on this link: the root, digests of the
    records, the removals and the cluster secret, and the rotation that set the secret."""
    return msgpack.packb([REPLY_TAG, channel.transcript(), reply.root, _digest(reply.records),
                          _digest(reply.removals), hashlib.sha256(reply.secret).digest(), reply.secret_epoch,
                          reply.rotated_by, reply.rotation_sig], use_bin_type=True)


def sign_reply(key: NodeKey, channel: JoinChannel, reply: JoinReply) -> bytes:
    return key.sign(reply_message(channel, reply))


def check_reply(sign_public: bytes, channel: JoinChannel, reply: JoinReply, sig: bytes) -> None:
    """Raise ``AuthError`` unless the member whose node key is ``sign_public`` signed this reply."""
    try:
        message = reply_message(channel, reply)
    except (TypeError, ValueError):
        raise AuthError("the join reply holds content that cannot be checked") from None
    try:
        verify(sign_public, message, sig)
    except AuthError:
        raise AuthError("the join reply is not signed by the member that was dialled "
                        "(forged or altered on the way)") from None
