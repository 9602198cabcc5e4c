"""Node identity: one ed25519 key; the CURVE (x25519) key for zmq is derived from it.

One key means one thing to register and one thing to check: the ZAP allow-list holds the derived
CURVE keys of members, and membership records are signed with the ed25519 key they derive from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from nacl import bindings
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey
from zmq.utils import z85

from edgemesh.errors import AuthError

NODE_ID_BYTES = 10


def node_id_for(sign_public: bytes) -> str:
    """Stable, short node id: the first 10 bytes of sha256(ed25519 public key), as hex."""
    return hashlib.sha256(sign_public).digest()[:NODE_ID_BYTES].hex()


def curve_public_for(sign_public: bytes) -> bytes:
    """z85 CURVE public key (what zmq and ZAP see) derived from an ed25519 public key."""
    try:
        return z85.encode(bindings.crypto_sign_ed25519_pk_to_curve25519(sign_public))
    except Exception as exc:  # libsodium refuses points not on the curve
        raise AuthError(f"not a valid ed25519 public key ({exc})") from None


@dataclass(frozen=True)
class NodeKey:
    """The secret half of a node's identity. Never logged, never sent."""

    seed: bytes  # 32 bytes

    @classmethod
    def generate(cls) -> NodeKey:
        return cls(bytes(SigningKey.generate()))

    @property
    def _signing(self) -> SigningKey:
        return SigningKey(self.seed)

    @property
    def sign_public(self) -> bytes:
        return bytes(self._signing.verify_key)

    @property
    def node_id(self) -> str:
        return node_id_for(self.sign_public)

    @property
    def curve_public(self) -> bytes:
        return curve_public_for(self.sign_public)

    @property
    def curve_secret(self) -> bytes:
        sk64 = self.seed + self.sign_public
        return z85.encode(bindings.crypto_sign_ed25519_sk_to_curve25519(sk64))

    def sign(self, message: bytes) -> bytes:
        return self._signing.sign(message).signature

    def __repr__(self) -> str:  # keep the seed out of logs and tracebacks
        return f"NodeKey(node_id={self.node_id})"


def verify(sign_public: bytes, message: bytes, signature: bytes) -> None:
    """Raise ``AuthError`` unless ``signature`` is ``sign_public``'s signature of ``message``."""
    try:
        VerifyKey(sign_public).verify(message, signature)
    except (BadSignatureError, ValueError, TypeError) as exc:
        raise AuthError(f"bad signature ({type(exc).__name__})") from None
