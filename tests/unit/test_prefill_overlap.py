"""Pieces of the overlapped prefill that need no links: quantized blocks converted once (q4 only
without the native library) give the
products of the per-call path bit for bit, and an allreduce that fails on the second thread
surfaces in the caller with the pool shut down."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from edgemesh import kernels
from edgemesh.collective.errors import CollectiveError
from edgemesh.llm import qlinear
from edgemesh.llm.model import OVERLAP_MIN_TOKENS, Participant
from edgemesh.weights.quant import quantize_block
from edgemesh.weights.shard import ShardSpec
from tests.unit.test_llm_equivalence import _blocks, _rank_provider
from tests.unit.test_q4 import _q4_config


@pytest.mark.parametrize("fmt", ["fp32", "int8", "q4"])
@pytest.mark.parametrize("rows", [OVERLAP_MIN_TOKENS // 2, 40])
def test_widened_block_gives_the_per_call_products_bitwise(fmt: str, rows: int) -> None:
    """Every matrix of both blocks, biases included (a q4 product adds its bias after the
    product; a bias fused into F.linear would round differently), partial-sum ones too."""
    config = _q4_config(qkv_bias=True, o_bias=True, mlp_bias=True)
    blocks = _blocks(config, seed=5)
    x = torch.randn(1, rows, config.hidden_size, generator=torch.Generator().manual_seed(1))
    mid = torch.randn(1, rows, config.intermediate_size, generator=torch.Generator().manual_seed(2))
    for block, names in (("attn_0", ("wq", "wk", "wv", "wo")), ("mlp_0", ("w_gate", "w_up", "w_down"))):
        w = blocks[block] if fmt == "fp32" else quantize_block(blocks[block], fmt)
        wide = qlinear.widened(w)
        for name in names:
            bias = {"wq": "bq", "wk": "bk", "wv": "bv", "wo": "bo", "w_gate": "b_gate", "w_up": "b_up",
                    "w_down": "b_down"}[name]
            assert bias in w, bias
            native_q4 = fmt == "q4" and kernels.native() is not None  # kernels.q4_linear takes it as it is
            assert wide[name] is w[name] if native_q4 else wide[name].dtype == torch.float32
            inp = mid if name == "w_down" else x
            if name == "wo":
                width = wide[name].shape[1] * (2 if wide[name].dtype == torch.uint8 else 1)  # q4: 2 per byte
                inp = torch.randn(1, rows, width, generator=torch.Generator().manual_seed(3))
            assert torch.equal(qlinear.linear(inp, wide, name, wide.get(bias)),
                               qlinear.linear(inp, w, name, w.get(bias))), (block, name)
            if fmt == "fp32":
                assert wide[name] is w[name]  # shared, not copied
        assert w[names[0]].dtype == {"fp32": torch.float32, "int8": torch.int8, "q4": torch.uint8}[fmt]


def test_a_block_over_the_cap_is_not_widened() -> None:
    block = quantize_block(_blocks(_q4_config(), seed=5)["mlp_0"], "int8")
    assert qlinear.widened(block, max_bytes=1) is block
    assert qlinear.widened(block, max_bytes=1 << 30) is not block


class _Failing:
    """Rank 0 of a pretend group of two whose allreduce fails at call ``bad`` (the others add
    the part to itself)."""

    rank, world_size = 0, 2

    def __init__(self, bad: int) -> None:
        self.bad, self.calls, self.failed_on = bad, 0, ""
        self.lock = threading.Lock()

    def allreduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.calls += 1
            n = self.calls
        if n == self.bad:
            self.failed_on = threading.current_thread().name
            raise CollectiveError("rank 1 is gone")
        return t + t

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)


def test_a_failed_allreduce_on_the_second_thread_raises_in_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEMESH_PREFILL_OVERLAP", "1")
    config = _q4_config()
    blocks = _blocks(config, seed=5)
    full = [ShardSpec.full(config)] * config.num_hidden_layers
    group = _Failing(bad=3)
    p = Participant(config, full, _rank_provider(config, blocks, full, 0), group, max_seq_len=64)  # type: ignore[arg-type]
    before = {t.name for t in threading.enumerate()}
    with torch.inference_mode(), pytest.raises(CollectiveError, match="rank 1 is gone"):
        p.run_layers(torch.randn(1, 40, config.hidden_size), 0)
    # It failed on the allreduce thread and reached the caller; the pool is shut down before
    # run_layers returns (no thread of it is left). At most the op queued behind the failed
    # one can still have run (cancel drops it only if the thread has not taken it yet).
    assert group.failed_on.startswith("edgemesh-prefill-allreduce")
    left = {t.name for t in threading.enumerate()} - before
    assert not any(n.startswith("edgemesh-prefill-allreduce") for n in left)
    assert group.bad <= group.calls <= group.bad + 1
