"""Join tokens: where to reach the cluster, whom to expect there, and the cluster secret.

Format: ``emt1.`` + base64url(msgpack({c: cluster id, s: secret, p: [[endpoint, key], …]})),
``endpoint`` a join endpoint (``tcp://host:port``) and ``key`` the ed25519 public key of the
member that listens there (the joiner derives its CURVE server key, so a stranger cannot pose as
the cluster). Treat a token like a password: it carries the secret.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import msgpack

from edgemesh.errors import TokenError

PREFIX = "emt1."
SECRET_BYTES = 32


@dataclass(frozen=True)
class JoinPoint:
    endpoint: str
    sign_public: bytes


@dataclass(frozen=True)
class JoinToken:
    cluster_id: str
    secret: bytes
    points: tuple[JoinPoint, ...]

    def encode(self) -> str:
        raw = msgpack.packb(
            {"c": self.cluster_id, "s": self.secret,
             "p": [[p.endpoint, p.sign_public] for p in self.points]},
            use_bin_type=True,
        )
        return PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> JoinToken:
        text = text.strip()
        if not text:
            raise TokenError("the join token is empty; copy it from `edgemesh init` or `edgemesh token`")
        if not text.startswith(PREFIX):
            raise TokenError("this is not an edgemesh join token (it should start with 'emt1.')")
        body = text[len(PREFIX):]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            obj = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        except (binascii.Error, ValueError, msgpack.ExtraData, msgpack.FormatError,
                msgpack.StackError, TypeError):
            raise TokenError("the join token is damaged (was it cut off when copying?)") from None
        try:
            cluster_id, secret, points = obj["c"], obj["s"], obj["p"]
            ok = (isinstance(cluster_id, str) and isinstance(secret, bytes)
                  and len(secret) == SECRET_BYTES and isinstance(points, list) and points)
            parsed = tuple(JoinPoint(str(e), bytes(k)) for e, k in points
                           if isinstance(e, str) and isinstance(k, bytes) and len(k) == 32)
        except (KeyError, TypeError, ValueError):
            ok, parsed = False, ()
        if not ok or len(parsed) != len(points):
            raise TokenError("the join token is damaged (missing or malformed fields)")
        return cls(cluster_id, secret, parsed)
