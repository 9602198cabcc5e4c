"""The overlapped prefill (``Participant._overlapped_layers``) over real TLS links: the same
result as the one-piece loop and as one device, every rank in step, allreduces on the second
thread, for fp32, int8 and q4 weights at W = 2 and an uneven W = 3 (one rank without a head)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from edgemesh.collective.base import LocalCollective
from edgemesh.llm import model as llm_model
from edgemesh.llm.follow import follow_master
from edgemesh.llm.model import Participant
from edgemesh.weights.quant import quantize_block
from edgemesh.weights.shard import ShardSpec, split_layer
from tests.integration.test_collective_zmq import close_all, in_threads, make_group
from tests.unit.test_llm_equivalence import _blocks, _rank_provider
from tests.unit.test_q4 import _q4_config

pytestmark = pytest.mark.integration

TOKENS = 40  # ≥ OVERLAP_MIN_TOKENS: chunks of 20 positions
SPLITS = {2: ([1, 1], [96, 96]), 3: ([1, 0, 1], [96, 64, 32])}


def _prefill(config: Any, blocks: Any, specs: list[ShardSpec], overlap: bool) -> list[Any]:
    """Every rank's prefill output, its group's op number after it, and the names of the
    threads its allreduces ran on."""
    groups = make_group(len(specs))
    threads: list[set[str]] = [set() for _ in specs]

    def rank(r: int) -> Any:
        mine = [specs[r]] * config.num_hidden_layers
        p = Participant(config, mine, _rank_provider(config, blocks, mine, r), groups[r], max_seq_len=64)
        inner = groups[r].allreduce_sum

        def recorded(t: torch.Tensor) -> torch.Tensor:
            threads[r].add(threading.current_thread().name)
            return inner(t)

        groups[r].allreduce_sum = recorded  # type: ignore[method-assign]
        h = torch.randn(1, TOKENS, config.hidden_size, generator=torch.Generator().manual_seed(11))
        with torch.inference_mode():
            out = p.run_layers(h, 0)
            # A decode step after it: the cache the chunks wrote is the cache a step reads.
            step = p.run_layers(torch.randn(1, 1, config.hidden_size, generator=torch.Generator().manual_seed(12)),
                                TOKENS)
        return out, step, groups[r]._seq

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("EDGEMESH_PREFILL_OVERLAP", "1" if overlap else "0")
            res = in_threads(len(specs), rank, timeout=60)
    finally:
        close_all(groups)
    for x in res:
        assert not isinstance(x, BaseException), x
    return [(*x, threads[r]) for r, x in enumerate(res)]


def _one_device(config: Any, blocks: Any) -> tuple[torch.Tensor, torch.Tensor]:
    full = [ShardSpec.full(config)] * config.num_hidden_layers
    p = Participant(config, full, _rank_provider(config, blocks, full, 0), LocalCollective(), max_seq_len=64)
    with torch.inference_mode():
        out = p.run_layers(torch.randn(1, TOKENS, config.hidden_size, generator=torch.Generator().manual_seed(11)), 0)
        step = p.run_layers(torch.randn(1, 1, config.hidden_size, generator=torch.Generator().manual_seed(12)), TOKENS)
    return out, step


@pytest.mark.parametrize("world", sorted(SPLITS))
@pytest.mark.parametrize("fmt", ["fp32", "int8", "q4"])
def test_overlapped_prefill_equals_the_one_piece_loop_and_one_device(world: int, fmt: str) -> None:
    config = _q4_config()
    blocks = _blocks(config, seed=3)
    if fmt != "fp32":
        blocks = {b: quantize_block(t, fmt) for b, t in blocks.items()}
    specs = split_layer(config, *SPLITS[world])
    got = _prefill(config, blocks, specs, overlap=True)
    want = _prefill(config, blocks, specs, overlap=False)
    ref, ref_step = _one_device(config, blocks)
    layers = config.num_hidden_layers
    for r in range(world):
        out, step, seq, threads = got[r]
        plain_out, plain_step, plain_seq, plain_threads = want[r]
        assert out.shape == ref.shape
        # Chunks change only how the products are blocked: fp32 rounding, not the math.
        torch.testing.assert_close(out, plain_out, rtol=0, atol=1e-5)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(step, ref_step, rtol=0, atol=1e-5)
        torch.testing.assert_close(step, plain_step, rtol=0, atol=1e-5)
        # Two ops per block and chunk instead of one per block; the step's two per layer after.
        assert plain_seq == 2 * layers + 2 * layers
        assert seq == 4 * layers + 2 * layers
        assert any(n.startswith("edgemesh-prefill-allreduce") for n in threads)
        assert not any(n.startswith("edgemesh-prefill-allreduce") for n in plain_threads)
    assert len({torch.equal(got[0][0], got[r][0]) for r in range(world)}) == 1  # every rank the same sum


def test_short_prompts_and_one_device_keep_the_one_piece_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEMESH_PREFILL_OVERLAP", "1")
    config = _q4_config()
    blocks = _blocks(config, seed=3)
    full = [ShardSpec.full(config)] * config.num_hidden_layers
    p = Participant(config, full, _rank_provider(config, blocks, full, 0), LocalCollective(), max_seq_len=64)
    assert not p.overlap_applies(TOKENS)  # one device: nothing to hide
    groups = make_group(2)
    try:
        specs = split_layer(config, *SPLITS[2])
        q = Participant(config, [specs[0]] * config.num_hidden_layers,
                        _rank_provider(config, blocks, [specs[0]] * config.num_hidden_layers, 0), groups[0],
                        max_seq_len=64)
        assert not q.overlap_applies(llm_model.OVERLAP_MIN_TOKENS - 1)
        assert q.overlap_applies(llm_model.OVERLAP_MIN_TOKENS)
        q.overlap_prefill = False  # a deployment across devices turns it off for its group
        assert not q.overlap_applies(llm_model.OVERLAP_MIN_TOKENS)
    finally:
        close_all(groups)
    # Run as the group runs it: 31 positions go in one piece (2 ops a layer), even when a
    # master's flag says overlap; 32 in two chunks (4 a layer).
    layers = config.num_hidden_layers
    specs = split_layer(config, *SPLITS[2])
    for positions, flag, ops in ((llm_model.OVERLAP_MIN_TOKENS - 1, None, 2), (llm_model.OVERLAP_MIN_TOKENS - 1, True, 2),
                                 (llm_model.OVERLAP_MIN_TOKENS, None, 4)):
        groups = make_group(2)
        try:
            def rank(r: int, positions: int = positions, flag: Any = flag) -> int:
                mine = [specs[r]] * layers
                p = Participant(config, mine, _rank_provider(config, blocks, mine, r), groups[r], max_seq_len=64)
                with torch.inference_mode():
                    p.run_layers(torch.randn(1, positions, config.hidden_size), 0, overlap=flag)
                return groups[r]._seq

            res = in_threads(2, rank, timeout=60)
        finally:
            close_all(groups)
        assert res == [ops * layers] * 2, (positions, flag, res)


def test_the_masters_choice_rules_the_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers chunk because the master's step says so, not by their own setting: a worker
    process started with EDGEMESH_PREFILL_OVERLAP=0 under a master without it stays in step.
    Served through the real master/follow loop over TLS, with a rank that holds no head rows
    (its logits slice is an empty tensor); logits equal one device's."""
    config = _q4_config()
    blocks = {b: quantize_block(t, "int8") for b, t in _blocks(config, seed=6).items()}
    specs = split_layer(config, *SPLITS[3])
    prompt = torch.randint(0, config.vocab_size, (1, TOKENS), generator=torch.Generator().manual_seed(2))
    full = [ShardSpec.full(config)] * config.num_hidden_layers
    one = Participant(config, full, _rank_provider(config, blocks, full, 0), LocalCollective(), max_seq_len=64)
    with torch.inference_mode():
        ref = one.forward(prompt, 0)
    groups = make_group(len(specs))
    seen: list[bool] = []

    role = threading.local()

    def rank(r: int) -> Any:
        role.master = r == 0
        mine = [specs[r]] * config.num_hidden_layers
        p = Participant(config, mine, _rank_provider(config, blocks, mine, r), groups[r], max_seq_len=64)
        with torch.inference_mode():
            if r == 0:
                logits = p.forward(prompt, 0)
                p.stop_workers()
                return logits, groups[r]._seq
            run = p.run_layers

            def spy(h: torch.Tensor, start_pos: int, *, overlap: bool | None = None) -> torch.Tensor:
                seen.append(bool(overlap))
                return run(h, start_pos, overlap=overlap)

            p.run_layers = spy  # type: ignore[method-assign]
            follow_master(p)
            return None, groups[r]._seq

    # Only the master's thread reads the setting as on: the workers' own reading says off.
    monkeypatch.setattr(llm_model, "_overlap_enabled", lambda: getattr(role, "master", False))
    try:
        res = in_threads(len(specs), rank, timeout=60)
    finally:
        close_all(groups)
    for x in res:
        assert not isinstance(x, BaseException), x
    torch.testing.assert_close(res[0][0], ref, rtol=0, atol=1e-5)
    assert seen == [True, True]
    assert len({seq for _, seq in res}) == 1  # every rank ran the same ops
