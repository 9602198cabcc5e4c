"""SmolLM2-135M-Instruct int8 against its fp32 import, and split int8 against single-device int8.

Quality bars (measured on 5 prompts when this was written: teacher-forced top-1 agreement
0.94–1.00, mean |Δlogit| 0.17–0.27 at decode, max|Δ|/max|logit| 0.074–0.078 at prefill; greedy
texts agree for the first 9–31 of 32 tokens). The asserted bounds leave margin for other CPUs
yet fail for a broken kernel or scale layout, which gives top-1 agreement near 0.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgemesh import kernels
from edgemesh.collective.base import Collective
from edgemesh.errors import ConfigError
from edgemesh.llm import qlinear
from edgemesh.llm.build import load_from_store
from edgemesh.llm.generate import generate
from edgemesh.llm.model import Participant
from edgemesh.llm.threaded import run_thread_group
from edgemesh.placement import plan, uniform_devices
from edgemesh.weights.bundled import bundled_path
from edgemesh.weights.gguf_import import import_gguf
from edgemesh.weights.store import ModelEntry, ModelStore

from .llm_fixtures import chat_prompts, prefill_and_generate, single_device, teacher_forced

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = 32
PROMPTS = ["Write a short poem about the sea.", "What is 17 times 3? Explain step by step.",
           "Name three capitals in Europe."]


@pytest.fixture(scope="module")
def entries(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelEntry, ModelEntry]:
    try:
        gguf: Path = bundled_path("smollm2-135m-instruct")
    except ConfigError as exc:
        pytest.skip(f"{exc}")
    store = ModelStore(tmp_path_factory.mktemp("store"))
    return import_gguf(store, gguf, name="fp32"), import_gguf(store, gguf, quantize="int8")


def _single(entry: ModelEntry) -> Participant:
    return single_device(entry)


def _prompts(entry: ModelEntry) -> list[list[int]]:
    return chat_prompts(entry, PROMPTS)


_teacher_forced = teacher_forced


def test_int8_quality_vs_fp32(entries: tuple[ModelEntry, ModelEntry]) -> None:
    fp, q8 = entries
    assert q8.name == "SmolLM2-135M-Instruct.Q4_1-int8" and q8.dtype == "int8"
    assert q8.nbytes() < 0.3 * fp.nbytes()
    m32, m8 = _single(fp), _single(q8)
    for ids in _prompts(fp):
        with torch.inference_mode():
            pre32, pre8 = m32.forward(torch.tensor([ids]), 0), m8.forward(torch.tensor([ids]), 0)
        ref_tokens = list(generate(m32, ids, N))
        got_tokens = list(generate(m8, ids, N))
        l32, l8 = _teacher_forced(m32, ids, ref_tokens), _teacher_forced(m8, ids, ref_tokens)
        top1 = (l8.argmax(-1) == l32.argmax(-1)).float().mean().item()
        mean_abs = (l8 - l32).abs().mean().item()
        pre_rel = ((pre8 - pre32).abs().max() / pre32.abs().max()).item()
        same = next((i for i, (a, b) in enumerate(zip(ref_tokens, got_tokens)) if a != b), N)
        print(f"int8 vs fp32: greedy prefix {same}/{N}, top-1 {top1:.2f}, decode mean|Δ| {mean_abs:.3f}, "
              f"max|Δ| {(l8 - l32).abs().max().item():.3f}, prefill max|Δ|/max|logit| {pre_rel:.4f}")
        assert top1 >= 0.85
        assert mean_abs <= 0.5
        assert pre_rel <= 0.15
        assert same >= 4


def test_int8_three_ranks_match_one(entries: tuple[ModelEntry, ModelEntry]) -> None:
    """The planner's real 3-way split of the real model against one device, native decode
    kernel (fp32 math throughout): the fp32 bar for prefill and for every decode step, and
    identical greedy texts."""
    if kernels.native() is None:
        pytest.skip("no native int8 kernel here (no C compiler); the torch-kernel test covers the split")
    _, q8 = entries
    ref, got, ref_dec, got_dec, _, _ = _three_vs_one(q8)
    for (pre_a, tok_a), (pre_b, tok_b), dec_a, dec_b in zip(ref, got, ref_dec, got_dec):
        assert ((pre_b - pre_a).abs().max() / pre_a.abs().max()).item() <= 1e-5
        split = ((dec_b - dec_a).abs().max() / dec_a.abs().max()).item()
        print(f"native kernel, 3 ranks vs 1: decode max|Δ|/max|logit| {split:.2e}")
        assert split <= 1e-5
        assert tok_b == tok_a


def _three_vs_one(q8: ModelEntry):  # type: ignore[no-untyped-def]
    p = plan(q8.config, uniform_devices(3, gflops=50, mem_bytes=4 << 30))
    specs = [p.specs_for(r) for r in range(3)]
    prompts = _prompts(q8)

    def run(m: Participant) -> list[tuple[torch.Tensor, list[int]]]:
        return prefill_and_generate(m, prompts, N)

    def build(coll: Collective) -> Participant:
        return load_from_store(q8, specs[coll.rank], coll, max_seq_len=256)

    single = _single(q8)
    ref = run(single)
    ref_dec = [_teacher_forced(single, ids, toks) for ids, (_, toks) in zip(prompts, ref)]

    def split_run(m: Participant):  # type: ignore[no-untyped-def]
        # decode logits on the single device's tokens, so both sides see the same inputs
        return run(m), [_teacher_forced(m, ids, toks) for ids, (_, toks) in zip(prompts, ref)]

    got, got_dec = run_thread_group(3, build, split_run)
    return ref, got, ref_dec, got_dec, single, prompts


def test_int8_three_ranks_match_one_torch_kernels(entries: tuple[ModelEntry, ModelEntry],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The same without the native kernel (torch's packed bf16 kernel at decode).

    Prefill (fp32 math): the fp32 bar. Decode logits: a split may re-round some of the bf16
    roundings that separate the packed kernel from exact int8 math (see tests/unit/test_int8.py),
    so the bar is twice that separation, measured here on the same tokens with the packed kernel
    switched off (about 1e-2 of max|logit| for this model). The same noise can flip a near-tie,
    so greedy texts of 1 and 3 ranks may part (seen once in 3×32 tokens); the top-1 of decode
    steps on the same inputs must agree on ≥ 95 %."""
    _, q8 = entries
    with kernels.torch_only():
        ref, got, ref_dec, got_dec, single, prompts = _three_vs_one(q8)
        monkeypatch.setattr(qlinear, "PACKED_MAX_ROWS", 0)
        exact = [_teacher_forced(single, ids, toks) for ids, (_, toks) in zip(prompts, ref)]
    agree = 0
    for (pre_a, tok_a), (pre_b, tok_b), dec_a, dec_b, dec_x in zip(ref, got, ref_dec, got_dec, exact):
        assert ((pre_b - pre_a).abs().max() / pre_a.abs().max()).item() <= 1e-5
        separation = ((dec_x - dec_a).abs().max() / dec_a.abs().max()).item()
        split = ((dec_b - dec_a).abs().max() / dec_a.abs().max()).item()
        same = next((i for i, (a, b) in enumerate(zip(tok_a, tok_b)) if a != b), N)
        agree += int((dec_b.argmax(-1) == dec_a.argmax(-1)).sum())
        print(f"3 ranks vs 1: decode max|Δ|/max|logit| {split:.2e} (packed vs exact int8 {separation:.2e}), "
              f"greedy prefix {same}/{N}")
        assert split <= 2 * separation
    assert agree >= 0.95 * N * len(prompts)
