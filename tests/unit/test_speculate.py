"""Speculative decoding (llm/speculate.py): greedy output identical to plain decoding on single
and split models whatever the proposals are, the sampled distribution unchanged, the proposers."""

from __future__ import annotations

import collections

import pytest
import torch

from edgemesh.collective.base import Collective, LocalCollective
from edgemesh.llm.generate import generate
from edgemesh.llm.model import Participant
from edgemesh.llm.sampling import Sampler, SamplingParams
from edgemesh.llm.speculate import AdaptiveK, DraftProposer, LookupProposer, SpecStats, speculative_generate, verify
from edgemesh.llm.threaded import run_thread_group
from edgemesh.weights.shard import ShardSpec, split_layer
from tests.unit.test_llm_equivalence import _blocks, _config, _rank_provider

pytestmark = pytest.mark.unit

N = 24


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: torch's second intra-op thread only costs here, and on a busy 2-core host it
    made each forward ~40x slower (spinning on a descheduled thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _single(config, blocks) -> Participant:  # type: ignore[no-untyped-def]
    full = [ShardSpec.full(config)] * config.num_hidden_layers
    return Participant(config, full, _rank_provider(config, blocks, full, 0), LocalCollective(), max_seq_len=128)


class Scripted:
    """Proposes the reference continuation, wrong at every ``wrong_every``-th proposed token:
    runs of accepted tokens with rejections at known places."""

    def __init__(self, prompt_len: int, reference: list[int], wrong_every: int, vocab: int) -> None:
        self.prompt_len, self.reference, self.wrong_every, self.vocab = prompt_len, reference, wrong_every, vocab
        self.calls = 0

    def propose(self, context: list[int], k: int) -> list[int]:
        done = len(context) - self.prompt_len
        out = []
        for tok in self.reference[done:done + k]:
            self.calls += 1
            out.append((tok + 1) % self.vocab if self.calls % self.wrong_every == 0 else tok)
        return out


PROMPT = [5, 17, 3, 99, 42, 17, 3]


@pytest.mark.parametrize("wrong_every", [2, 3, 1000])
def test_greedy_identical_to_plain_on_one_device(wrong_every):
    config = _config()
    blocks = _blocks(config)
    plain = list(generate(_single(config, blocks), PROMPT, N))
    stats = SpecStats()
    got = list(speculative_generate(_single(config, blocks), PROMPT, N, Scripted(len(PROMPT), plain, wrong_every, 128),
                                    sampler=Sampler(SamplingParams()), k=AdaptiveK(k=4, probe_every=10**6),
                                    stats=stats))
    assert got == plain
    assert stats.proposed > 0
    if wrong_every == 1000:
        # All proposals right: far fewer forwards than tokens.
        assert stats.accepted == stats.proposed and stats.steps < N // 2
    else:
        assert 0 < stats.accepted < stats.proposed


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_greedy_identical_to_plain_split(world):
    config = _config(num_attention_heads=8, num_key_value_heads=4)
    blocks = _blocks(config, seed=1)
    plain = list(generate(_single(config, blocks), PROMPT, N))
    groups, rows = {1: ([4], [96]), 2: ([1, 3], [60, 36]), 3: ([2, 0, 2], [40, 0, 56]),
                    4: ([1, 1, 1, 1], [10, 30, 50, 6])}[world]  # uneven, a rank with nothing
    layer_specs = [split_layer(config, groups, rows) for _ in range(config.num_hidden_layers)]

    def build(coll: Collective) -> Participant:
        mine = [layer[coll.rank] for layer in layer_specs]
        return Participant(config, mine, _rank_provider(config, blocks, mine, coll.rank), coll, max_seq_len=128)

    def master(p: Participant) -> list[int]:
        return list(speculative_generate(p, PROMPT, N, Scripted(len(PROMPT), plain, 3, 128),
                                         sampler=Sampler(SamplingParams()), k=AdaptiveK(k=3, probe_every=10**6)))

    assert run_thread_group(world, build, master, timeout=120) == plain


def test_a_draft_model_identical_to_the_target_has_every_proposal_accepted():
    config = _config()
    blocks = _blocks(config, seed=2)
    plain = list(generate(_single(config, blocks), PROMPT, N))
    stats = SpecStats()
    got = list(speculative_generate(_single(config, blocks), PROMPT, N, DraftProposer(_single(config, blocks)),
                                    sampler=Sampler(SamplingParams()), k=AdaptiveK(k=4, probe_every=10**6),
                                    stats=stats))
    assert got == plain
    assert stats.accepted == stats.proposed > N // 2


def test_stop_tokens_and_max_tokens_end_speculation_where_plain_would():
    config = _config()
    blocks = _blocks(config)
    plain = list(generate(_single(config, blocks), PROMPT, N))
    stop = plain[9]
    want = list(generate(_single(config, blocks), PROMPT, N, stop_ids=[stop]))
    got = list(speculative_generate(_single(config, blocks), PROMPT, N, Scripted(len(PROMPT), plain, 1000, 128),
                                    [stop], sampler=Sampler(SamplingParams())))
    assert got == want and got[-1] == stop
    got = list(speculative_generate(_single(config, blocks), PROMPT, 5, Scripted(len(PROMPT), plain, 1000, 128),
                                    sampler=Sampler(SamplingParams())))
    assert got == plain[:5]


def test_the_acceptance_rule_keeps_the_sampling_distribution():
    """Whatever is proposed, the first emitted token has exactly the sampler's distribution:
    P(d) accepted + (1 - P(d)) · residual = p. Empirically over 6,000 seeded draws, for a likely,
    an unlikely and a filtered-out (top-k) proposal; then two proposals in a row."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5, -3.0, 0.2])
    sampler = Sampler(SamplingParams(temperature=0.9, top_k=6, seed=7))
    p = sampler.probs(logits)
    n = 6_000
    for d in (0, 2, 6):  # 6 is cut by top-k: never accepted, plain distribution
        seen = collections.Counter(_first(logits, d, sampler) for _ in range(n))
        tv = 0.5 * sum(abs(seen.get(t, 0) / n - float(p[t])) for t in range(len(p)))
        assert tv < 0.03, (d, tv, seen)
    # The check can tell: accepting every proposal would be far off.
    assert 0.5 * (abs(1 - float(p[2])) + sum(float(p[t]) for t in range(len(p)) if t != 2)) > 0.5
    # Second position: given the first proposal accepted, the next token follows the second row.
    other = torch.tensor([0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    p2 = sampler.probs(other)
    seen2: collections.Counter = collections.Counter()
    for _ in range(n):
        acc, nxt = verify(torch.stack([logits, other, logits]), [0, 1], sampler)
        if acc[:1] == [0]:
            seen2[acc[1] if len(acc) == 2 else nxt] += 1
    m = sum(seen2.values())
    assert abs(m / n - float(p[0])) < 0.03
    tv2 = 0.5 * sum(abs(seen2.get(t, 0) / m - float(p2[t])) for t in range(len(p2)))
    assert tv2 < 0.05, (tv2, seen2)


def _first(logits: torch.Tensor, d: int, sampler: Sampler) -> int:
    acc, nxt = verify(torch.stack([logits, logits]), [d], sampler)
    return acc[0] if acc else nxt


def test_sampling_end_to_end_matches_plain_decoding_statistics():
    """On a tiny model: the second new token's marginal equals Σ_t1 p(t1) p(t2 | t1)."""
    config = _config(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
                     num_hidden_layers=1, vocab_size=8)
    model = _single(config, _blocks(config, seed=4))
    ref = Sampler(SamplingParams(temperature=1.5))
    prompt = [1, 2, 3]
    with torch.inference_mode():
        p1 = ref.probs(model.forward(torch.tensor([prompt]), 0)[0, -1])
        exact = torch.zeros(config.vocab_size)
        for t1 in range(config.vocab_size):
            exact += p1[t1] * ref.probs(model.forward(torch.tensor([prompt + [t1]]), 0)[0, -1])
    likely = int(torch.argmax(exact))

    class Fixed:
        def propose(self, context: list[int], k: int) -> list[int]:
            return [likely] * k

    n = 600
    seen: collections.Counter = collections.Counter()
    stats = SpecStats()
    for seed in range(n):
        out = list(speculative_generate(model, prompt, 2, Fixed(), sampler=Sampler(SamplingParams(1.5, seed=seed)),
                                        k=AdaptiveK(k=1, probe_every=10**6), stats=stats))
        seen[out[1]] += 1
    assert 0.05 < stats.acceptance_rate < 0.95, stats
    tv = 0.5 * sum(abs(seen.get(t, 0) / n - float(exact[t])) for t in range(config.vocab_size))
    assert tv < 0.08, (tv, sorted(seen.items()), exact.tolist())


def test_lookup_proposer_continues_the_most_recent_match():
    p = LookupProposer(max_ngram=3)
    ctx = [1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 0, 2, 3]
    assert p.propose(ctx, 2) == [7, 8]  # "2 3" last seen before 7 8
    assert p.propose([1, 2, 3], 4) == []  # nothing earlier matches
    assert p.propose(ctx, 0) == []
    assert p.propose([4, 4, 4], 3) == [4]


def test_adaptive_k_grows_shrinks_and_turns_off_when_it_does_not_pay():
    k = AdaptiveK(k=2, k_max=8)
    k.spec_step(2, 2, 0.01)
    assert k.k == 4
    k.spec_step(4, 0, 0.01)
    assert k.k == 2
    slow = AdaptiveK(k=2)
    slow.plain_step(0.010)  # 100 tokens/s plain
    for _ in range(4):
        slow.spec_step(2, 0, 0.020)  # 50 tokens/s speculating
    assert slow.off and slow.want_plain()
    fast = AdaptiveK(k=2)
    fast.plain_step(0.010)
    for _ in range(4):
        fast.spec_step(2, 2, 0.012)
    assert not fast.off


@pytest.mark.parametrize("k_max", [3, 8])
def test_greedy_identical_to_plain_with_int8_weights(k_max):
    """int8 decode steps go through the packed bf16 kernel for up to PACKED_MAX_ROWS rows and
    dequantize beyond: with k + 1 ≤ 4 positions the check sees the rounding plain steps see."""
    from edgemesh.weights.quant import quantize_block

    config = _config()
    blocks = {b: quantize_block(blk, "int8") for b, blk in _blocks(config, seed=5).items()}
    plain = list(generate(_single(config, blocks), PROMPT, N))
    got = list(speculative_generate(_single(config, blocks), PROMPT, N, Scripted(len(PROMPT), plain, 3, 128),
                                    sampler=Sampler(SamplingParams()), k=AdaptiveK(k=3, k_max=k_max, probe_every=10**6)))
    assert got == plain
