"""64-byte alignment of the tensors handed to native kernels (``weights/aligned.py``).

``aten._weight_int8pack_mm`` segfaults on AVX-512/AMX CPUs when its int8 weight does not start
on a 64-byte boundary, and safetensors hands out tensors at whatever offset the file layout
gives. This CPU may not crash on a misaligned weight, so the tests check what reaches the kernel
(a hook records each operand's pointer) and that results do not depend on the offset.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgemesh import kernels
from edgemesh.collective.base import LocalCollective
from edgemesh.llm import qlinear
from edgemesh.llm.build import load_from_store
from edgemesh.weights.aligned import ALIGNMENT, aligned, load_aligned
from edgemesh.weights.provider import InMemoryProvider
from edgemesh.weights.quant import SCALE, quantize_int8
from edgemesh.weights.shard import ShardSpec
from edgemesh.weights.store import ModelStore
from edgemesh.weights.synth import synth_model
from tests.unit.test_llm_equivalence import _config

pytestmark = pytest.mark.unit

N, K = 96, 64  # K a multiple of 32: the packed kernel's path


def _offsets(t: torch.Tensor) -> int:
    return t.data_ptr() % ALIGNMENT


@pytest.fixture
def kernel_operands(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int, int]]]:
    """Pointer offsets (x, weight, scale) of every call of the packed kernel, with edgemesh's
    own kernel switched off (it is the torch fallback whose alignment is under test; the native
    kernel uses unaligned loads)."""
    seen: list[tuple[int, int, int]] = []
    real = qlinear._packed_mm

    def hook(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        seen.append((_offsets(x), _offsets(w), _offsets(s)))
        assert w.is_contiguous() and s.is_contiguous() and x.is_contiguous()
        return real(x, w, s)

    monkeypatch.setattr(qlinear, "_packed_mm", hook)
    with kernels.torch_only():
        yield seen


def _weights() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return quantize_int8(torch.randn(N, K, generator=g) / K**0.5)


def test_fresh_allocations_are_aligned() -> None:
    """The premise of ``aligned``: torch's CPU allocator gives 64-byte aligned storage."""
    for n in (1, 3, 63, 65, 4097, 1 << 20):
        assert _offsets(torch.empty(n, dtype=torch.int8)) == 0


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_int8_matmul_at_every_offset(scale_dtype: torch.dtype, kernel_operands: list[tuple[int, int, int]]) -> None:
    q, s = _weights()
    s = s.to(scale_dtype)
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(3))
    want = qlinear.linear(x, {"w": q.clone(), "w" + SCALE: s.clone()}, "w")
    buf = torch.zeros(N * K + ALIGNMENT, dtype=torch.int8)
    sbuf = torch.zeros(N + ALIGNMENT, dtype=scale_dtype)
    for off in range(ALIGNMENT):
        w = buf[off:off + N * K].view(N, K)
        w.copy_(q)
        soff = off // s.element_size()  # the scale at every offset its element size allows
        sv = sbuf[soff:soff + N]
        sv.copy_(s)
        xv = torch.zeros(2 * K + ALIGNMENT, dtype=torch.float32)[off % 16:off % 16 + 2 * K].view(2, K)
        xv.copy_(x)
        assert _offsets(w) == off  # the weight really is misaligned by `off` bytes
        got = qlinear.linear(xv, {"w": w, "w" + SCALE: sv}, "w")
        assert torch.equal(got, want), off
    assert len(kernel_operands) == ALIGNMENT + 1
    assert all(o == (0, 0, 0) for o in kernel_operands)


def test_aligned_keeps_aligned_tensors_and_copies_the_rest() -> None:
    q, _ = _weights()
    assert aligned(q) is q  # no copy when nothing is wrong
    buf = torch.zeros(q.numel() + 8, dtype=torch.int8)
    off = buf[8:8 + q.numel()].view(N, K)
    off.copy_(q)
    fixed = aligned(off)
    assert fixed is not off and _offsets(fixed) == 0 and torch.equal(fixed, q)
    t = q.t()  # aligned pointer but not contiguous: kernels want contiguous rows
    assert aligned(t).is_contiguous() and torch.equal(aligned(t), t)


def _write_unaligned(path: Path, lead: int) -> dict[str, torch.Tensor]:
    """A block file whose int8 weight lands at a file offset decided by a ``lead``-byte tensor."""
    q, s = _weights()
    tensors = {"a_lead": torch.arange(lead, dtype=torch.int8), "w": q, "w" + SCALE: s}
    save_file(tensors, str(path))
    return tensors


def test_safetensors_round_trip_is_aligned(tmp_path: Path) -> None:
    raw_offsets = set()
    for lead in range(1, 65):
        path = tmp_path / f"b{lead}.safetensors"
        want = _write_unaligned(path, lead)
        raw_offsets.add(_offsets(load_file(str(path))["w"]))
        for got in (load_aligned(path), InMemoryProvider.from_files({"blk": path}).get("blk")):
            assert got.keys() == want.keys()
            for k, v in got.items():
                assert _offsets(v) == 0 and torch.equal(v, want[k]), (lead, k)
    # safetensors itself hands out misaligned weights (the case being fixed): most offsets occur
    assert len(raw_offsets - {0}) >= 32, sorted(raw_offsets)


def test_provider_aligns_whatever_it_is_given(kernel_operands: list[tuple[int, int, int]]) -> None:
    q, s = _weights()
    buf = torch.zeros(q.numel() + 8, dtype=torch.int8)
    w = buf[8:8 + q.numel()].view(N, K)
    w.copy_(q)
    p = InMemoryProvider({"blk": {"w": w, "w" + SCALE: s}})
    got = p.get("blk")
    assert _offsets(got["w"]) == 0 and torch.equal(got["w"], q)
    assert got["w" + SCALE] is s  # already aligned: kept, not copied
    qlinear.linear(torch.randn(1, K), got, "w")
    assert kernel_operands == [(0, 0, 0)]


def test_store_slices_reach_the_kernel_aligned(tmp_path: Path, kernel_operands: list[tuple[int, int, int]]) -> None:
    config = _config()
    entry = synth_model(ModelStore(tmp_path / "store"), config, seed=5, quantize="int8")
    spec = ShardSpec((1, 2), 30, 70, False)
    raw_offsets = []
    for block in config.block_names():
        loaded = [entry.load_block(block)]
        if block.startswith(("attn_", "mlp_")):  # the blocks a participant gets slices of
            loaded.append(entry.load_slice(entry.slice(block, spec)))
        for tensors in loaded:
            assert all(_offsets(t) == 0 for t in tensors.values()), block
        raw = load_file(str(entry.path(block)))
        raw_offsets += [_offsets(t) for t in raw.values() if (t.numel() * t.element_size()) % 64 == 0]
    # the store lays its files out aligned (safetensors_io), so even a plain mapping of them is;
    # misaligned files (safetensors' own writer) are covered above
    assert raw_offsets and set(raw_offsets) == {0}
    full = [ShardSpec.full(config)] * config.num_hidden_layers
    model = load_from_store(entry, full, LocalCollective(), max_seq_len=16)
    with torch.inference_mode():
        model.forward(torch.tensor([[1, 2, 3]]), 0)
        model.forward(torch.tensor([[4]]), 3)  # one decode step: the packed kernel
    assert kernel_operands and all(o == (0, 0, 0) for o in kernel_operands)
