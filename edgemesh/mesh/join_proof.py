"""What both sides of a join prove, and to whom: the MACs and the signed reply, bound to the link.

Every proof covers one *channel transcript*: the cluster id, the server's CURVE key as the
client dialled it, the client's CURVE key as the server's link authenticated it, and both
nonces. Someone who relays a join (an impostor announcing itself on the LAN, dialled with its
own key, who opens its own link to a real member) sits between two links with different key
pairs, so nothing a member says on one link verifies on the other. The wire format is in
protocols/wire.md ("Join handshake").
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

import msgpack

from edgemesh.errors import AuthError
from edgemesh.identity.keys import NodeKey, verify

TRANSCRIPT_TAG = "edgemesh-join-v2"
SERVER_TAG = b"edgemesh-join-server-v2"
CLIENT_TAG = b"edgemesh-join-client-v2"
REPLY_TAG = "edgemesh-join-reply-v2"


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


def reply_message(channel: JoinChannel, root: str, records: list[Any]) -> bytes:
    """What the member signs when it answers a register: the view it hands over, on this link."""
    digest = hashlib.sha256(msgpack.packb(records, use_bin_type=True)).digest()
    return msgpack.packb([REPLY_TAG, channel.transcript(), root, digest], use_bin_type=True)


def sign_reply(key: NodeKey, channel: JoinChannel, root: str, records: list[Any]) -> bytes:
    return key.sign(reply_message(channel, root, records))


def check_reply(sign_public: bytes, channel: JoinChannel, root: str, records: list[Any], sig: bytes) -> None:
    """Raise ``AuthError`` unless the member whose node key is ``sign_public`` signed this reply."""
    try:
        message = reply_message(channel, root, records)
    except (TypeError, ValueError):
        raise AuthError("the join reply holds content that cannot be checked") from None
    try:
        verify(sign_public, message, sig)
    except AuthError:
        raise AuthError("the join reply is not signed by the member that was dialled "
                        "(forged or altered on the way)") from None
