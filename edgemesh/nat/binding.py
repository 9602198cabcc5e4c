"""Signalling messages and the channel hello, both bound to node identities. Sans-IO.

An ICE channel is only as trustworthy as the signalling that set it up, and signalling crosses
a third member (the relay). So:

* every offer/answer is signed by the sender's node key over the ICE credentials, the
  candidates and the DTLS certificate fingerprints; the receiver checks it against the key the
  membership view holds for the claimed sender. A relay can drop or delay signals, never
  forge or alter them.
* DTLS then checks the peer's certificate against the signed fingerprint, and the first
  message on the channel is a *hello*: each side signs the whole transcript (session id, both
  nonces, both fingerprints, both node ids). A peer that holds a channel but not the member's
  key (a valid-looking channel with the wrong key) fails here and is refused.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable

import msgpack

from edgemesh.errors import AuthError, ProtocolError
from edgemesh.identity.keys import NodeKey, verify
from edgemesh.wire.schema import need, unpack_map

SIGNAL_CONTEXT = "edgemesh-ice-signal-v1"
HELLO_CONTEXT = "edgemesh-ice-hello-v1"
KINDS = ("offer", "answer")
SID_BYTES = 16
NONCE_BYTES = 16
MAX_CANDIDATES = 32
MAX_SIGNAL_BYTES = 16 * 1024
MAX_SKEW_MS = 5 * 60 * 1000  # signals older (or newer) than this are replays or broken clocks

KeyLookup = Callable[[str], "bytes | None"]  # node id -> ed25519 public key of a member


@dataclass(frozen=True)
class Signal:
    kind: str  # offer | answer
    sid: bytes  # session id, chosen by the offerer
    sender: str
    receiver: str
    ufrag: str
    pwd: str
    candidates: tuple[str, ...]  # ICE candidates in SDP attribute form
    fingerprints: tuple[tuple[str, str], ...]  # DTLS certificate (algorithm, value)
    nonce: bytes
    relay: bool  # may the session use TURN? (upgrade attempts do not)
    ts: int  # sender's wall clock, ms
    sig: bytes = b""

    def _signed_part(self, cluster_id: str) -> bytes:
        return msgpack.packb(
            [SIGNAL_CONTEXT, cluster_id, self.kind, self.sid, self.sender, self.receiver, self.ufrag,
             self.pwd, list(self.candidates), [list(f) for f in self.fingerprints], self.nonce,
             self.relay, self.ts],
            use_bin_type=True)

    def signed(self, cluster_id: str, key: NodeKey) -> Signal:
        from dataclasses import replace

        return replace(self, sig=key.sign(self._signed_part(cluster_id)))

    def encode(self) -> bytes:
        return msgpack.packb({
            "t": self.kind, "sid": self.sid, "from": self.sender, "to": self.receiver,
            "ufrag": self.ufrag, "pwd": self.pwd, "cands": list(self.candidates),
            "fp": [list(f) for f in self.fingerprints], "nonce": self.nonce, "relay": self.relay,
            "ts": self.ts, "sig": self.sig,
        }, use_bin_type=True)


def new_sid() -> bytes:
    return secrets.token_bytes(SID_BYTES)


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def now_ms() -> int:
    return int(time.time() * 1000)


def decode_signal(data: Any) -> Signal:
    """Parse an untrusted signal (no signature check yet). Malformed -> ``ProtocolError``."""
    obj = unpack_map(data, MAX_SIGNAL_BYTES, "signal")
    kind = need(obj, "t", str)
    if kind not in KINDS:
        raise ProtocolError(f"unknown signal type {kind!r}")
    sid, nonce = need(obj, "sid", bytes), need(obj, "nonce", bytes)
    if len(sid) != SID_BYTES or len(nonce) != NONCE_BYTES:
        raise ProtocolError("bad session id or nonce length")
    cands = need(obj, "cands", list, max_len=MAX_CANDIDATES)
    if not all(isinstance(c, str) and len(c) < 256 for c in cands):
        raise ProtocolError("candidates must be short strings")
    fps = need(obj, "fp", list, max_len=4)
    if not fps or not all(isinstance(f, list) and len(f) == 2 and all(isinstance(x, str) and len(x) < 200 for x in f)
                          for f in fps):
        raise ProtocolError("fingerprints must be [algorithm, value] pairs")
    relay = need(obj, "relay", bool)
    return Signal(
        kind=kind, sid=sid, sender=need(obj, "from", str, max_len=64), receiver=need(obj, "to", str, max_len=64),
        ufrag=need(obj, "ufrag", str, max_len=256), pwd=need(obj, "pwd", str, max_len=256),
        candidates=tuple(cands), fingerprints=tuple((f[0], f[1]) for f in fps), nonce=nonce, relay=relay,
        ts=need(obj, "ts", int), sig=need(obj, "sig", bytes, max_len=64),
    )


def check_signal(cluster_id: str, sig: Signal, me: str, key_of: KeyLookup, now: int | None = None) -> None:
    """Raise ``AuthError`` unless ``sig`` is for ``me``, fresh, and signed by its claimed sender."""
    if sig.receiver != me:
        raise AuthError(f"signal for {sig.receiver}, not for this node")
    key = key_of(sig.sender)
    if key is None:
        raise AuthError(f"signal from {sig.sender}, who is not a member")
    if abs((now if now is not None else now_ms()) - sig.ts) > MAX_SKEW_MS:
        raise AuthError("stale signal (replayed, or the clocks differ by minutes)")
    try:
        verify(key, sig._signed_part(cluster_id), sig.sig)
    except AuthError:
        raise AuthError(f"signal claiming to be from {sig.sender} is not signed by its key") from None


def hello_transcript(cluster_id: str, offer: Signal, answer: Signal, sender: str, receiver: str) -> bytes:
    """What each side signs on the channel: the session as both signals describe it."""
    return msgpack.packb(
        [HELLO_CONTEXT, cluster_id, offer.sid, offer.nonce, answer.nonce,
         [list(f) for f in offer.fingerprints], [list(f) for f in answer.fingerprints], sender, receiver],
        use_bin_type=True)


def make_hello(cluster_id: str, key: NodeKey, offer: Signal, answer: Signal, me: str, peer: str) -> bytes:
    sig = key.sign(hello_transcript(cluster_id, offer, answer, me, peer))
    return msgpack.packb({"node": me, "sig": sig}, use_bin_type=True)


def check_hello(cluster_id: str, data: Any, peer_key: bytes, offer: Signal, answer: Signal, me: str, peer: str) -> None:
    """Raise ``ProtocolError`` (malformed) or ``AuthError`` (wrong key) unless ``peer`` signed it."""
    obj = unpack_map(data, 1024, "hello")
    if need(obj, "node", str, max_len=64) != peer:
        raise AuthError("the channel's peer names another node")
    try:
        verify(peer_key, hello_transcript(cluster_id, offer, answer, peer, me), need(obj, "sig", bytes, max_len=64))
    except AuthError:
        raise AuthError(f"the channel's peer does not hold the key of member {peer}") from None
