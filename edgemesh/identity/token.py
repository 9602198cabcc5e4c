"""Join tokens: where to reach the cluster, whom to expect there, and a join secret that expires.

Format: ``emt2.`` + base64url(msgpack({c: cluster id, s: join secret, x: expiry, p: [[endpoint,
key], …]})), ``endpoint`` a join endpoint (``tcp://host:port``) and ``key`` the ed25519 public
key of the member that listens there (the joiner derives its CURVE server key, so a stranger
cannot pose as the cluster). ``x`` is the expiry in Unix seconds and ``s`` is *not* the cluster
secret but ``HMAC-SHA256(cluster secret, "edgemesh-token-v1" ‖ cluster id ‖ u64be(x))``: a
member recomputes it from the expiry the joiner names, so a token cannot be stretched past its
expiry, and it stops working everywhere once the cluster secret is rotated. The joiner learns the
cluster secret only after it is admitted. Treat a token like a password until it expires.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import struct
import time
from dataclasses import dataclass

import msgpack

from edgemesh.errors import TokenError

PREFIX = "emt2."
OLD_PREFIX = "emt1."
SECRET_BYTES = 32
TOKEN_TAG = b"edgemesh-token-v1"
DEFAULT_TTL = 24 * 3600.0  # seconds
MAX_TTL = 366 * 24 * 3600.0
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """``30m``, ``24h``, ``7d``, ``90s``, ``2w`` or plain seconds → seconds (positive, ≤ 366 days)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text.lower())
    if m is None:
        raise TokenError(f"cannot read the duration {text!r}: use a number with s, m, h, d or w (e.g. 30m, 24h, 7d)")
    seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if not 0 < seconds <= MAX_TTL:
        raise TokenError(f"a token lifetime must be more than 0 and at most 366 days, not {text!r}")
    return seconds


def token_secret(cluster_secret: bytes, cluster_id: str, expires: int) -> bytes:
    """The join secret of every token of this cluster that expires at ``expires``."""
    return hmac.new(cluster_secret, TOKEN_TAG + cluster_id.encode() + struct.pack(">Q", expires),
                    hashlib.sha256).digest()


def describe_expiry(expires: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expires))


@dataclass(frozen=True)
class JoinPoint:
    endpoint: str
    sign_public: bytes


@dataclass(frozen=True)
class JoinToken:
    cluster_id: str
    secret: bytes  # the token's join secret (``token_secret``), not the cluster secret
    points: tuple[JoinPoint, ...]
    expires: int  # Unix seconds

    @classmethod
    def issue(cls, cluster_id: str, cluster_secret: bytes, points: tuple[JoinPoint, ...] | list[JoinPoint],
              ttl: float = DEFAULT_TTL, now: float | None = None) -> JoinToken:
        expires = int((time.time() if now is None else now) + ttl)
        return cls(cluster_id, token_secret(cluster_secret, cluster_id, expires), tuple(points), expires)

    def encode(self) -> str:
        raw = msgpack.packb(
            {"c": self.cluster_id, "s": self.secret, "x": self.expires,
             "p": [[p.endpoint, p.sign_public] for p in self.points]},
            use_bin_type=True,
        )
        return PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> JoinToken:
        text = text.strip()
        if not text:
            raise TokenError("the join token is empty; copy it from `edgemesh init` or `edgemesh token`")
        if text.startswith(OLD_PREFIX):
            raise TokenError("this join token is of an old kind that never expires and is no longer accepted; "
                             "get a new one with `edgemesh token` on a member")
        if not text.startswith(PREFIX):
            raise TokenError("this is not an edgemesh join token (it should start with 'emt2.')")
        body = text[len(PREFIX):]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            obj = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        except (binascii.Error, ValueError, msgpack.ExtraData, msgpack.FormatError,
                msgpack.StackError, TypeError):
            raise TokenError("the join token is damaged (was it cut off when copying?)") from None
        try:
            cluster_id, secret, points, expires = obj["c"], obj["s"], obj["p"], obj["x"]
            ok = (isinstance(cluster_id, str) and isinstance(secret, bytes)
                  and len(secret) == SECRET_BYTES and isinstance(points, list) and points
                  and isinstance(expires, int) and not isinstance(expires, bool) and 0 < expires < 2**63)
            parsed = tuple(JoinPoint(str(e), bytes(k)) for e, k in points
                           if isinstance(e, str) and isinstance(k, bytes) and len(k) == 32)
        except (KeyError, TypeError, ValueError):
            ok, parsed = False, ()
        if not ok or len(parsed) != len(points):
            raise TokenError("the join token is damaged (missing or malformed fields)")
        return cls(cluster_id, secret, parsed, expires)

