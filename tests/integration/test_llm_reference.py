"""SmolLM2-135M-Instruct through edgemesh (1 and 3 participants) = transformers, token for token.

The reference is transformers loading the *GGUF file itself* (its own dequantization and Q/K
un-permutation), so this also checks our importer, not only our model math.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgemesh.collective.base import Collective, LocalCollective
from edgemesh.errors import ConfigError
from edgemesh.llm.build import load_from_store
from edgemesh.llm.generate import generate
from edgemesh.llm.model import Participant
from edgemesh.llm.threaded import run_thread_group
from edgemesh.llm.tokenizer import ChatTokenizer
from edgemesh.placement import plan, uniform_devices
from edgemesh.weights.bundled import bundled_path
from edgemesh.weights.gguf_import import import_gguf
from edgemesh.weights.shard import ShardSpec
from edgemesh.weights.store import ModelEntry, ModelStore

from .llm_fixtures import prefill_and_generate

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = 32
PROMPTS = [
    [{"role": "user", "content": "Write a short poem about the sea."}],
    [{"role": "user", "content": "What is 17 times 3? Explain step by step."}],
]


@pytest.fixture(scope="module")
def gguf() -> Path:
    try:
        return bundled_path("smollm2-135m-instruct")
    except ConfigError as exc:
        pytest.skip(f"{exc}")


@pytest.fixture(scope="module")
def entry(gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelEntry:
    return import_gguf(ModelStore(tmp_path_factory.mktemp("store")), gguf, name="smollm2")


@pytest.fixture(scope="module")
def prompts(entry: ModelEntry) -> list[list[int]]:
    tok = ChatTokenizer.from_entry(entry)
    return [tok.encode_chat(m) for m in PROMPTS]


@pytest.fixture(scope="module")
def reference(gguf: Path, prompts: list[list[int]]) -> list[tuple[torch.Tensor, list[int]]]:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                              dtype=torch.float32)
    model.eval()
    out = []
    with torch.inference_mode():
        for ids in prompts:
            # Plain greedy loop (no EOS stop, no logits processors) for exactly N tokens.
            res = model(torch.tensor([ids]), use_cache=True)
            logits, past, toks = res.logits, res.past_key_values, []
            for _ in range(N):
                t = int(res.logits[0, -1].argmax())
                toks.append(t)
                res = model(torch.tensor([[t]]), past_key_values=past, use_cache=True)
                past = res.past_key_values
            out.append((logits, toks))
    return out


def _run(entry: ModelEntry, world: int, prompts: list[list[int]]) -> list[tuple[torch.Tensor, list[int]]]:
    if world == 1:
        specs_by_rank = [[ShardSpec.full(entry.config)] * entry.config.num_hidden_layers]
    else:
        p = plan(entry.config, uniform_devices(world, gflops=50, mem_bytes=4 << 30))
        specs_by_rank = [p.specs_for(r) for r in range(world)]

    def build(coll: Collective) -> Participant:
        return load_from_store(entry, specs_by_rank[coll.rank], coll, max_seq_len=256)

    def master(m: Participant) -> list[tuple[torch.Tensor, list[int]]]:
        return prefill_and_generate(m, prompts, N)

    if world == 1:
        return master(build(LocalCollective()))
    return run_thread_group(world, build, master)


@pytest.mark.parametrize("world", [1, 3])
def test_smollm2_matches_transformers(world: int, entry: ModelEntry, prompts: list[list[int]],
                                      reference: list[tuple[torch.Tensor, list[int]]]) -> None:
    got = _run(entry, world, prompts)
    for (ref_logits, ref_toks), (logits, toks) in zip(reference, got):
        rel = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
        assert rel <= 1e-5, f"logits differ: max|Δ|/max|logit| = {rel:.2e}"
        assert toks == ref_toks


def test_tokenizer_and_template_match_transformers(gguf: Path, entry: ModelEntry) -> None:
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ours = ChatTokenizer.from_entry(entry)
    for text in ["Hello, world!", "What is 12345 + 678?", "  two  spaces\n\nnewline\ttab", "héllo 日本語 🙂",
                 "<|im_start|>user\nhi<|im_end|>", "don't I'll we've"]:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    for msgs in PROMPTS:
        assert ours.apply_chat_template(msgs) == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours.stop_ids() == {ref.eos_token_id}


@pytest.mark.parametrize("world", [1, 3])
def test_speculative_decoding_gives_the_plain_smollm2_text(world: int, entry: ModelEntry) -> None:
    """Prompt lookup on a rewrite (most proposals accepted) and a chat (few): token for token
    the greedy text of plain decoding, on one device and split over three."""
    from edgemesh.llm.sampling import Sampler, SamplingParams
    from edgemesh.llm.speculate import LookupProposer, SpecStats, speculative_generate

    tok = ChatTokenizer.from_entry(entry)
    para = ("The old lighthouse stood at the edge of the cliff for more than a century. Sailors relied on its beam "
            "to find their way home through storms and fog.")
    asks = [tok.encode_chat([{"role": "user", "content": f"Repeat this paragraph exactly:\n\n{para}"}]),
            tok.encode_chat(PROMPTS[0])]
    specs_by_rank = ([[ShardSpec.full(entry.config)] * entry.config.num_hidden_layers] if world == 1 else
                     [plan(entry.config, uniform_devices(world, gflops=50, mem_bytes=4 << 30)).specs_for(r)
                      for r in range(world)])

    def build(coll: Collective) -> Participant:
        return load_from_store(entry, specs_by_rank[coll.rank], coll, max_seq_len=256)

    def master(m: Participant) -> list[tuple[list[int], list[int], SpecStats]]:
        out = []
        for ids in asks:
            plain = list(generate(m, ids, N))
            stats = SpecStats()
            spec = list(speculative_generate(m, ids, N, LookupProposer(), sampler=Sampler(SamplingParams()), stats=stats))
            out.append((plain, spec, stats))
        return out

    results = master(build(LocalCollective())) if world == 1 else run_thread_group(world, build, master)
    for plain, spec, _ in results:
        assert spec == plain
    assert results[0][2].accepted >= N // 2  # the rewrite really went through accepted proposals
