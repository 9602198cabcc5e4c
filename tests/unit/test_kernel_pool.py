"""The native kernels' thread pool: any thread count gives bitwise the values of one thread.

The products split their output rows over ``torch.get_num_threads()`` threads (the rank's
budget, ``runtime.cpu``); a row's arithmetic does not depend on which thread computes it. Also:
several Python threads calling at once (the pool serves one job, the others compute alone),
and a forked child (no helpers there: it must not wait for them).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from collections.abc import Iterator

import pytest
import torch

from edgemesh import kernels
from edgemesh.llm.model import KVCache, attention_block, mlp_block
from edgemesh.llm.rope import rope_table
from edgemesh.weights.config import ModelConfig
from edgemesh.weights.quant import SCALE, quantize_block, quantize_int8, quantize_q4
from edgemesh.weights.synth import random_block
from tests.unit.concurrent import in_threads

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("native_kernels")]

THREADS = (1, 2, 3, 4)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _matrix(fmt: str, n: int, k: int, seed: int) -> dict[str, torch.Tensor]:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    q, s = quantize_q4(w) if fmt == "q4" else quantize_int8(w)
    return {"w": q, "w" + SCALE: s}


def _gemv(fmt: str, x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    f = kernels.q4_gemv if fmt == "q4" else kernels.int8_gemv
    return f(x, w["w"], w["w" + SCALE])


@pytest.mark.parametrize("fmt", ["int8", "q4"])
def test_products_are_bitwise_the_same_for_any_thread_count(fmt: str) -> None:
    for n, k, rows in ((1, 64, 1), (33, 576, 1), (577, 576, 2), (4099, 96, 1), (1536, 576, 4), (70, 1536, 3)):
        w = _matrix(fmt, n, k, seed=n + k)
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(n))
        outs = {}
        for t in THREADS:
            with _threads(t):
                outs[t] = _gemv(fmt, x, w)
                assert kernels.pool_threads() == t
        for t in THREADS[1:]:
            assert torch.equal(outs[t], outs[1]), (fmt, n, k, t)


@pytest.mark.parametrize("fmt", ["int8", "q4"])
def test_decode_blocks_are_bitwise_the_same_for_any_thread_count(fmt: str) -> None:
    cfg = ModelConfig(576, 1536, 9, 3, 1, 100, max_position_embeddings=32)
    wa = quantize_block(random_block(cfg, "attn_0", seed=1), fmt)
    wm = quantize_block(random_block(cfg, "mlp_0", seed=2), fmt)
    cos, sin = rope_table(cfg, 32)
    shape = (1, 3, 32, cfg.head_dim)
    x = torch.randn(1, 1, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    results = {}
    for t in THREADS:
        cache = KVCache(torch.zeros(shape), torch.zeros(shape))
        with _threads(t):
            outs = [attention_block(x, wa, cache, p, cos[p:p + 1], sin[p:p + 1], cfg) for p in range(5)]
            outs.append(mlp_block(x, wm, cfg))
        results[t] = (outs, cache.k.clone(), cache.v.clone())
    for t in THREADS[1:]:
        outs, k, v = results[t]
        assert all(torch.equal(a, b) for a, b in zip(outs, results[1][0])), t
        assert torch.equal(k, results[1][1]) and torch.equal(v, results[1][2])


def test_several_callers_at_once_with_a_pool() -> None:
    """Python threads with a budget of 2 each call at once: one job uses the pool, the others
    run alone; every result has the same bits."""
    w = _matrix("q4", 1537, 576, seed=5)
    x = torch.randn(1, 576, generator=torch.Generator().manual_seed(1))
    with _threads(1):
        one = _gemv("q4", x, w)

    def body(i: int) -> bool:
        torch.set_num_threads(2)  # this thread's budget (each thread has its own)
        return all(torch.equal(_gemv("q4", x, w), one) for _ in range(100))

    assert in_threads(4, body) == [True] * 4


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_computes_without_the_parents_helpers() -> None:
    w = _matrix("int8", 4099, 576, seed=9)
    x = torch.randn(1, 576, generator=torch.Generator().manual_seed(2))
    with _threads(2):
        want = _gemv("int8", x, w)  # the parent's pool now has a helper thread
        assert kernels.pool_threads() == 2
        r, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its pool must be 1 thread, then grow again on demand
            ok = False
            try:
                ok = kernels.pool_threads() == 1 and torch.equal(_gemv("int8", x, w), want)
                ok = ok and kernels.pool_threads() == 2
            finally:
                os.write(wfd, b"1" if ok else b"0")
                os._exit(0)
    os.close(wfd)
    try:
        ready, _, _ = select.select([r], [], [], 120)
        got = os.read(r, 1) if ready else b""
    finally:
        os.close(r)
        if not got:
            os.kill(pid, signal.SIGKILL)  # hung: our own child, by pid
        os.waitpid(pid, 0)
    assert got == b"1"


def test_block_weight_checks_are_redone_when_the_dict_changes() -> None:
    """The block calls cache their weight checks per dict; a dict that holds another tensor, or
    whose tensor was freed, is checked again (a malformed one then takes the torch path)."""
    cfg = ModelConfig(64, 128, 2, 1, 1, 100, max_position_embeddings=8)
    w = quantize_block(random_block(cfg, "mlp_0", seed=4), "int8")
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(5))
    first = kernels.mlp_decode(x, w, 1e-5)
    assert first is not None and id(w) in kernels._checked
    assert torch.equal(kernels.mlp_decode(x, w, 1e-5), first)  # cached: same result
    good = w["w_gate"]
    w["w_gate"] = good[:-1].clone()  # a malformed slice in place of the checked tensor
    assert kernels.mlp_decode(x, w, 1e-5) is None
    w["w_gate"] = good
    assert torch.equal(kernels.mlp_decode(x, w, 1e-5), first)
    del good
    w.pop("w_up")  # the checked tensor is freed: the entry goes with it
    assert id(w) not in kernels._checked
