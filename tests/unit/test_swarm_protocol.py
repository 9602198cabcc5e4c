"""Golden vectors of protocols/swarm.md: the commitment and the shared seed, order and pairs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgemesh.swarm.commit import commitment
from edgemesh.swarm.pairs import pair_schedule, round_seed, shuffled_order
from edgemesh.swarm.verdict import parse_choice, parse_verdict

pytestmark = pytest.mark.unit

VECTORS = json.loads((Path(__file__).parents[2] / "protocols/vectors/swarm.json").read_text(encoding="utf-8"))


def _spec_commitment(query_id: str, member: str, nonce: str, answer: str) -> str:
    """The formula as protocols/swarm.md writes it, independently of the implementation."""
    h = hashlib.sha256(b"edgemesh-swarm-commit-v1\x00")
    for f in (query_id, member, nonce, answer):
        b = f.encode()
        h.update(len(b).to_bytes(8, "big") + b)
    return h.hexdigest()


@pytest.mark.parametrize("v", VECTORS["commitments"])
def test_commitment_vectors(v):
    assert commitment(v["query_id"], v["member"], v["answer"], v["nonce"]) == v["commitment"]
    assert _spec_commitment(v["query_id"], v["member"], v["nonce"], v["answer"]) == v["commitment"]


def test_seed_order_and_pairs_vectors():
    v = VECTORS["round_seed"]
    seed = round_seed(v["query_id"], v["commitments"])
    assert seed == v["seed"]
    h = hashlib.sha256(b"edgemesh-swarm-seed-v1\x00" + v["query_id"].encode())
    for c in sorted(v["commitments"]):
        h.update(b"\x00" + c.encode())
    assert int.from_bytes(h.digest()[:8], "big") == seed
    assert shuffled_order(5, seed) == v["order_of_5"]
    assert [list(p) for p in pair_schedule(5)] == v["pairs_of_5"]


@given(st.text(max_size=300))
def test_parsers_never_fail_on_arbitrary_text(text):
    assert parse_verdict(text) in ("A", "B", "U")
    assert parse_choice(text) in (None, "A", "B", "C", "D")
