"""The native decode blocks (one token, int8 weights) against the torch ops they replace.

``attention_block``/``mlp_block`` hand a decode token to ``kernels.attention_decode`` /
``kernels.mlp_decode`` when they apply; here both paths run on the same random int8 blocks,
positions and KV caches, and must agree to fp32 rounding (1e-5 of the output's magnitude),
including the cache contents they write, for GQA and MHA, a rank's slice of the heads, and
positions across the whole cache.
"""

from __future__ import annotations

import pytest
import torch

import contextlib
from collections.abc import Iterator

from edgemesh import kernels
from edgemesh.llm import qlinear
from edgemesh.llm.model import KVCache, attention_block, mlp_block
from edgemesh.llm.rope import rope_table
from edgemesh.weights.config import ModelConfig
from edgemesh.weights.quant import quantize_block
from edgemesh.weights.shard import slice_block, split_layer
from edgemesh.weights.synth import random_block

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("native_kernels")]


@contextlib.contextmanager
def _torch_exact() -> Iterator[None]:
    """The torch ops with exact int8 math (dequantized fp32, not the bf16 packed kernel)."""
    saved = qlinear.PACKED_MAX_ROWS
    qlinear.PACKED_MAX_ROWS = 0
    try:
        with kernels.torch_only():
            yield
    finally:
        qlinear.PACKED_MAX_ROWS = saved


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(("heads", "kv"), [(9, 3), (4, 4), (8, 1)])
def test_attention_decode_matches_torch(heads: int, kv: int) -> None:
    cfg = ModelConfig(64 * heads, 256, heads, kv, 1, 100, max_position_embeddings=64)
    w = quantize_block(random_block(cfg, "attn_0", seed=heads + kv), "int8")
    cos, sin = rope_table(cfg, 64)
    d = cfg.head_dim
    g = torch.Generator().manual_seed(7)
    shape = (1, kv, 64, d)
    k0, v0 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    for pos in (0, 1, 17, 63):
        x = torch.randn(1, 1, cfg.hidden_size, generator=g)
        c1, c2 = KVCache(k0.clone(), v0.clone()), KVCache(k0.clone(), v0.clone())
        got = attention_block(x, w, c1, pos, cos[pos:pos + 1], sin[pos:pos + 1], cfg)
        with _torch_exact():
            ref = attention_block(x, {k: v for k, v in w.items()}, c2, pos, cos[pos:pos + 1], sin[pos:pos + 1], cfg)
        assert _rel(got, ref) <= 1e-5, pos
        assert _rel(c1.k, c2.k) <= 1e-6 and torch.equal(c1.v[:, :, pos + 1:], v0[:, :, pos + 1:])
        assert _rel(c1.v[:, :, pos], c2.v[:, :, pos]) <= 1e-6


def test_native_blocks_are_used_and_slices_work(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ModelConfig(576, 1536, 9, 3, 1, 100, max_position_embeddings=32)
    full_a = quantize_block(random_block(cfg, "attn_0", seed=1), "int8")
    full_m = quantize_block(random_block(cfg, "mlp_0", seed=2), "int8")
    cos, sin = rope_table(cfg, 32)
    calls: list[str] = []
    real_a, real_m = kernels.attention_decode, kernels.mlp_decode
    def counted(name, fn):  # type: ignore[no-untyped-def]
        def run(*a, **k):  # type: ignore[no-untyped-def]
            out = fn(*a, **k)
            if out is not None:
                calls.append(name)
            return out
        return run

    monkeypatch.setattr(kernels, "attention_decode", counted("attn", real_a))
    monkeypatch.setattr(kernels, "mlp_decode", counted("mlp", real_m))
    x = torch.randn(1, 1, 576, generator=torch.Generator().manual_seed(3))
    for spec in split_layer(cfg, [1, 1, 1], [500, 500, 536]):  # three ranks' slices, summed like the allreduce does
        sa, sm = slice_block(cfg, "attn_0", full_a, spec), slice_block(cfg, "mlp_0", full_m, spec)
        n_kv = sa["wk"].shape[0] // cfg.head_dim
        cache = KVCache(torch.zeros(1, n_kv, 32, cfg.head_dim), torch.zeros(1, n_kv, 32, cfg.head_dim))
        cache2 = KVCache(cache.k.clone(), cache.v.clone())
        got = attention_block(x, sa, cache, 5, cos[5:6], sin[5:6], cfg) + mlp_block(x, sm, cfg)
        with _torch_exact():
            ref = attention_block(x, sa, cache2, 5, cos[5:6], sin[5:6], cfg) + mlp_block(x, sm, cfg)
        assert _rel(got, ref) <= 1e-5
    assert calls.count("attn") == 3 and calls.count("mlp") == 3


def test_mlp_decode_matches_torch() -> None:
    cfg = ModelConfig(576, 1536, 9, 3, 1, 100, max_position_embeddings=32)
    w = quantize_block(random_block(cfg, "mlp_0", seed=4), "int8")
    x = torch.randn(1, 1, 576, generator=torch.Generator().manual_seed(5))
    got = mlp_block(x, w, cfg)
    with _torch_exact():
        ref = mlp_block(x, w, cfg)
    assert _rel(got, ref) <= 1e-5


def test_blocks_with_biases_or_float_weights_keep_the_torch_path() -> None:
    cfg = ModelConfig(256, 512, 4, 2, 1, 100, max_position_embeddings=16)
    fw = random_block(cfg, "attn_0", seed=6)
    x = torch.randn(1, 1, 256)
    cache = KVCache(torch.zeros(1, 2, 16, 64), torch.zeros(1, 2, 16, 64))
    cos, sin = rope_table(cfg, 16)
    assert kernels.attention_decode(x, fw, cache.k, cache.v, 0, cos[:1], sin[:1], 1e-5, 64) is None
    qw = quantize_block(fw, "int8")
    qw["bq"] = torch.zeros(qw["wq"].shape[0])
    assert kernels.attention_decode(x, qw, cache.k, cache.v, 0, cos[:1], sin[:1], 1e-5, 64) is None
    assert kernels.mlp_decode(x, random_block(cfg, "mlp_0", seed=6), 1e-5) is None


def test_malformed_slices_never_reach_the_c_code() -> None:
    """Sizes that disagree (a malformed slice) fall back to the torch ops instead of letting the
    C code read past a tensor."""
    cfg = ModelConfig(256, 512, 4, 2, 1, 100, max_position_embeddings=16)
    qa = quantize_block(random_block(cfg, "attn_0", seed=8), "int8")
    qm = quantize_block(random_block(cfg, "mlp_0", seed=8), "int8")
    x = torch.randn(1, 1, 256)
    cache = KVCache(torch.zeros(1, 2, 16, 64), torch.zeros(1, 2, 16, 64))
    cos, sin = rope_table(cfg, 16)
    assert kernels.attention_decode(x, qa, cache.k, cache.v, 3, cos[3:4], sin[3:4], 1e-5, 64) is not None
    for name, bad in (("wo", qa["wo"][:, :64].contiguous()), ("wq.scale", qa["wq.scale"][:-1].contiguous()),
                      ("norm", qa["norm"][:128].contiguous())):
        assert kernels.attention_decode(x, {**qa, name: bad}, cache.k, cache.v, 3, cos[3:4], sin[3:4], 1e-5, 64) is None
    small = torch.zeros(1, 2, 4, 64)
    assert kernels.attention_decode(x, qa, small, small.clone(), 3, cos[3:4], sin[3:4], 1e-5, 64) is not None
    assert kernels.attention_decode(x, qa, small, small.clone(), 4, cos[4:5], sin[4:5], 1e-5, 64) is None
    assert kernels.mlp_decode(x, qm, 1e-5) is not None
    assert kernels.mlp_decode(x, {**qm, "w_down": qm["w_down"][:, :100].contiguous()}, 1e-5) is None
