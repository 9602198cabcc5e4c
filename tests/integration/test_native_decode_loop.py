"""The native decode loop (kernels.decode_layers with the group's direct allreduce as a C
callback) over real TLS links: the same bits as the Python loop, op numbering and byte counts
kept, and an op the C side cannot finish handed to Python mid-loop."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from edgemesh import kernels
from edgemesh.collective import native, shm
from edgemesh.llm.model import Participant
from edgemesh.weights.quant import quantize_block
from edgemesh.weights.shard import split_layer
from tests.integration.test_collective_zmq import close_all, in_threads, make_group
from tests.unit.test_llm_equivalence import _blocks, _rank_provider
from tests.unit.test_q4 import _q4_config

pytestmark = pytest.mark.integration

STEPS = 6


def _run(groups: list[Any], config: Any, blocks: Any, specs: list[Any], *, stop_at: int | None = None) -> list[Any]:
    """Prefill 5 tokens, then STEPS decode steps of run_layers on every rank: per rank, each
    step's output, the ops the C side finished, the group's op number, its wire bytes, and
    whether the native loop ran."""

    def rank(r: int) -> Any:
        mine = [specs[r]] * config.num_hidden_layers
        p = Participant(config, mine, _rank_provider(config, blocks, mine, r), groups[r], max_seq_len=32)
        g = torch.Generator().manual_seed(7)
        h = torch.randn(1, 5, config.hidden_size, generator=g)
        outs = []
        with torch.inference_mode():
            p.run_layers(h, 0)
            for i in range(STEPS):
                x = torch.randn(1, 1, config.hidden_size, generator=g)
                allreduce = groups[r].native_allreduce(config.hidden_size)
                if stop_at is not None and i == stop_at and allreduce is not None:
                    # Held from the start of this step, as after Python read ahead: every op
                    # stops in C without I/O and is done by finish().
                    begin = allreduce.begin

                    def held(begin: Any = begin, allreduce: Any = allreduce) -> bool:
                        ok = begin()
                        allreduce._ctx.n = -1
                        return ok

                    allreduce.begin = held  # type: ignore[method-assign]
                outs.append(p.run_layers(x, 5 + i).clone())
                if stop_at is not None and i == stop_at and allreduce is not None:
                    del allreduce.begin  # the class's again: unheld at the next step
            looped = p._table is not None
            # A new KV cache (another batch size came and went) means a new table: the old one
            # points into the old cache.
            old, p._batch = p._table, 0
            p.run_layers(h, 0)
            p.run_layers(torch.randn(1, 1, config.hidden_size, generator=g), 5)
            assert not looped or (p._table is not old and p._table.keep[2][0] is p._caches[0].k)
        return outs, groups[r]._links.native_ops, groups[r]._seq, groups[r].wire_bytes, looped

    res = in_threads(len(groups), rank, timeout=60)
    for x in res:
        assert not isinstance(x, BaseException), x
    return res


# Two KV heads: over 3 ranks one has no head of any layer.
SPLITS = {2: ([1, 1], [96, 96]), 3: ([1, 0, 1], [96, 64, 32])}


@pytest.fixture(params=sorted(SPLITS))
def model(request: Any) -> Any:
    if kernels.native() is None or native.native() is None:
        pytest.skip("no C compiler: the native kernels are off")
    config = _q4_config()
    blocks = {b: quantize_block(t, "q4") for b, t in _blocks(config, seed=1).items()}
    return config, blocks, split_layer(config, *SPLITS[request.param])


# Two KV heads: over 2 ranks each runs the native loop; over 3 the one without a head too (its
# attention blocks add zeros), on the same wire; or through shared memory.
@pytest.mark.parametrize("plane", ["sockets", "shared memory"])
def test_the_native_loop_gives_the_python_loops_bits(model: Any, plane: str) -> None:
    config, blocks, specs = model
    shared = plane == "shared memory"
    if shared and shm.library() is None:
        pytest.skip("no shared-memory plane here")
    fast, slow = make_group(len(specs), shared_memory=shared), make_group(len(specs))
    try:
        for g in slow:
            g._links._native = None  # the Python loop and Python allreduces
        got = _run(fast, config, blocks, specs)
        want = _run(slow, config, blocks, specs)
    finally:
        close_all(fast)
        close_all(slow)
    layers = config.num_hidden_layers
    for r in range(len(specs)):
        outs, ops, seq, wire, looped = got[r]
        ref_outs, ref_ops, ref_seq, ref_wire, _ = want[r]
        assert all(torch.equal(a, b) for a, b in zip(outs, ref_outs)), f"rank {r}"
        assert looped
        if shared:  # every float32 allreduce through memory: none numbered, nothing on the wire
            assert fast[r].shared_memory and ops == 0 and wire < ref_wire
            assert fast[r]._shm.ctx.seq - 1 == 2 * layers * (STEPS + 3)
            continue
        assert ref_ops == 0 and ops == 2 * layers * (STEPS + 3)  # every op in C (the prefills' too)
        assert seq == ref_seq and wire == ref_wire  # numbered and counted as the Python path


def test_ops_the_loop_cannot_finish_go_to_python_mid_loop(model: Any) -> None:
    config, blocks, specs = model
    fast, slow = make_group(len(specs)), make_group(len(specs))
    try:
        for g in slow:
            g._links._native = None
        got = _run(fast, config, blocks, specs, stop_at=2)
        want = _run(slow, config, blocks, specs)
    finally:
        close_all(fast)
        close_all(slow)
    for r in range(len(specs)):
        assert all(torch.equal(a, b) for a, b in zip(got[r][0], want[r][0])), f"rank {r}"
        # Step 2's ops went through Python on the ranks in the loop; the others ran in C (an
        # op may also fall back when a peer's record is not whole yet as Python reads it).
        every = 2 * config.num_hidden_layers * (STEPS + 3)
        assert every - 2 * config.num_hidden_layers * 2 <= got[r][1] <= every - 2 * config.num_hidden_layers
        assert got[r][2:4] == want[r][2:4]


def test_one_device_runs_the_loop_without_allreduces(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A world of one (LocalCollective) runs the same loop with no callback: the same bits as
    the per-block native calls from Python."""
    from edgemesh.collective.base import LocalCollective
    from edgemesh.weights.shard import ShardSpec

    config, blocks, _ = model
    full = [ShardSpec.full(config)] * config.num_hidden_layers

    def run() -> tuple[list[torch.Tensor], bool]:
        p = Participant(config, full, _rank_provider(config, blocks, full, 0), LocalCollective(), max_seq_len=32)
        g = torch.Generator().manual_seed(3)
        with torch.inference_mode():
            p.run_layers(torch.randn(1, 5, config.hidden_size, generator=g), 0)
            outs = [p.run_layers(torch.randn(1, 1, config.hidden_size, generator=g), 5 + i).clone()
                    for i in range(STEPS)]
        return outs, p._table is not None

    looped, used = run()
    monkeypatch.setattr(Participant, "_native_layers", lambda *a: None)
    plain, _ = run()
    assert used
    assert all(torch.equal(a, b) for a, b in zip(looped, plain))
