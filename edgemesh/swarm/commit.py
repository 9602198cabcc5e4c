"""Commit–reveal of answers: every member fixes its answer (by hash) before anyone sees another's,
so nobody can copy or tailor an answer to the others."""

from __future__ import annotations

import hashlib
import hmac
import random
import secrets

_DOMAIN = b"edgemesh-swarm-commit-v1\0"
NONCE_BYTES = 16


def new_nonce(rng: random.Random | None = None) -> str:
    """A fresh hex nonce (``rng`` only for reproducible simulations; real members use secrets)."""
    if rng is None:
        return secrets.token_hex(NONCE_BYTES)
    return rng.getrandbits(8 * NONCE_BYTES).to_bytes(NONCE_BYTES, "big").hex()


def commitment(query_id: str, member: str, answer: str, nonce: str) -> str:
    """sha256 over the query, the member and the answer, salted by the nonce: binding to this query
    and this member, so a commitment cannot be replayed elsewhere or claimed by another member;
    hiding, because the nonce is secret until the reveal. Length-prefixed fields: no ambiguity."""
    h = hashlib.sha256(_DOMAIN)
    for field in (query_id, member, nonce, answer):
        b = field.encode("utf-8")
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)
    return h.hexdigest()


def verify_reveal(query_id: str, member: str, committed: str, answer: str, nonce: str) -> bool:
    """True when (answer, nonce) opens ``committed``. Malformed inputs are simply False."""
    if not isinstance(committed, str) or not isinstance(answer, str) or not isinstance(nonce, str):
        return False
    if len(nonce) != 2 * NONCE_BYTES:
        return False
    return hmac.compare_digest(commitment(query_id, member, answer, nonce), committed)
