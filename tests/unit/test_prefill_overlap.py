"""Pieces of the overlapped prefill that need no links: quantized blocks converted once give the
products of the per-call path bit for bit, and an allreduce that fails on the second thread
surfaces in the caller with no op left running."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from edgemesh.collective.errors import CollectiveError
from edgemesh.llm import qlinear
from edgemesh.llm.model import OVERLAP_MIN_TOKENS, Participant
from edgemesh.weights.quant import SCALE, quantize_block
from edgemesh.weights.shard import ShardSpec
from tests.unit.test_llm_equivalence import _blocks, _rank_provider
from tests.unit.test_q4 import _q4_config


@pytest.mark.parametrize("fmt", ["fp32", "int8", "q4"])
@pytest.mark.parametrize("rows", [OVERLAP_MIN_TOKENS // 2, 40])
def test_widened_block_gives_the_per_call_products_bitwise(fmt: str, rows: int) -> None:
    config = _q4_config()
    block = _blocks(config, seed=5)["mlp_0"]
    if fmt != "fp32":
        block = quantize_block(block, fmt)
    wide = qlinear.widened(block)
    x = torch.randn(1, rows, config.hidden_size, generator=torch.Generator().manual_seed(1))
    for name in ("w_gate", "w_up"):
        assert wide[name].dtype == torch.float32
        assert torch.equal(qlinear.linear(x, wide, name), qlinear.linear(x, block, name))
    if fmt == "q4":
        assert "w_gate" + SCALE not in wide  # dequantized: the scales are in the values
    if fmt == "fp32":
        assert wide["w_gate"] is block["w_gate"]  # shared, not copied
    assert block["w_gate"].dtype == {"fp32": torch.float32, "int8": torch.int8, "q4": torch.uint8}[fmt]


class _Failing:
    """Rank 0 of a pretend group of two whose allreduce fails at call ``bad`` (the others add
    the part to itself)."""

    rank, world_size = 0, 2

    def __init__(self, bad: int) -> None:
        self.bad, self.calls = bad, 0
        self.lock = threading.Lock()

    def allreduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.calls += 1
            n = self.calls
        if n == self.bad:
            raise CollectiveError("rank 1 is gone")
        return t + t

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)


def test_a_failed_allreduce_on_the_second_thread_raises_in_the_caller() -> None:
    config = _q4_config()
    blocks = _blocks(config, seed=5)
    full = [ShardSpec.full(config)] * config.num_hidden_layers
    group = _Failing(bad=3)
    p = Participant(config, full, _rank_provider(config, blocks, full, 0), group, max_seq_len=64)  # type: ignore[arg-type]
    before = {t.name for t in threading.enumerate()}
    with torch.inference_mode(), pytest.raises(CollectiveError, match="rank 1 is gone"):
        p.run_layers(torch.randn(1, 40, config.hidden_size), 0)
    # The pool is shut down before run_layers returns: no thread of it is left, and no op after
    # the failed one ran later (a queued one is dropped; at most the next one had started).
    left = {t.name for t in threading.enumerate()} - before
    assert not any(n.startswith("edgemesh-prefill-allreduce") for n in left)
    assert group.calls <= 4
