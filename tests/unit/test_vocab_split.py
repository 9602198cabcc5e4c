"""The LM head split by vocabulary rows, the distributed argmax and the distributed sampler.

- ``vocab_range`` tiles the vocabulary in rank order with at least one row per rank.
- A group whose every rank holds its head rows gives the single device's logits (fp32: 1e-5
  relative, like the decoder; int8: the bars of test_int8) and the same greedy tokens.
- The distributed argmax is ``torch.argmax`` of the whole logits, ties included.
- The distributed sampler draws from ``Sampler.probs`` of the whole logits: 20k seeded draws
  per case, total variation and a chi-square test against the exact probabilities.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chi2

from edgemesh.collective.base import Collective, LocalCollective
from edgemesh.collective.inproc import make_thread_group
from edgemesh.errors import ConfigError
from edgemesh.llm.choice import CANDIDATES, Choice, ChoiceError, decide, summarize
from edgemesh.llm.generate import generate
from edgemesh.llm.model import Participant
from edgemesh.llm.sampling import Sampler, SamplingParams
from edgemesh.llm.threaded import run_thread_group
from edgemesh.weights.config import ModelConfig
from edgemesh.weights.provider import InMemoryProvider
from edgemesh.weights.quant import quantize_block
from edgemesh.weights.shard import ShardSpec, slice_block, slice_head, split_layer, vocab_range
from tests.unit.test_llm_equivalence import SPLITS, _blocks, _config, _prompt

pytestmark = pytest.mark.unit

TOL = 1e-5
DECODE_TOL = 1e-2  # int8 decode steps (packed bf16 kernel), as in test_int8
N_TOKENS = 24
DECODE = [3, 9, 27, 81]

torch.set_num_threads(1)


# ---- the vocabulary ranges -------------------------------------------------------------------

@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("vocab", [128, 5, 49152])
def test_vocab_ranges_tile_the_vocabulary_with_a_row_each(split: str, vocab: int) -> None:
    config = _config(vocab_size=vocab)
    specs = [split_layer(config, g, f) for g, f in SPLITS[split]]
    world = len(specs[0])
    ranges = [vocab_range(config, [layer[r] for layer in specs], r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == vocab
    assert all(a < b for a, b in ranges)  # every rank one row at least, even with no MLP rows
    assert all(ranges[r][1] == ranges[r + 1][0] for r in range(world - 1))
    if vocab == 49152:  # rows follow the MLP share of layer 0 (to a row per rank)
        rows0 = SPLITS[split][0][1]
        for (a, b), f in zip(ranges, rows0):
            assert abs((b - a) - vocab * f / config.intermediate_size) <= world + 1


def test_vocab_range_refuses_more_ranks_than_rows() -> None:
    config = _config(vocab_size=3)
    specs = [split_layer(config, [1] * 4, [24] * 4)] * config.num_hidden_layers
    with pytest.raises(ConfigError, match="cannot give each of 4 ranks"):
        vocab_range(config, [layer[0] for layer in specs], 0, 4)


# ---- split head = one device -----------------------------------------------------------------

def _head_blocks(config: ModelConfig, blocks: dict, specs: list[ShardSpec], rank: int, world: int) -> dict:
    """What ``rank_files`` gives a rank: decoder slices, its head rows, the embedding on rank 0."""
    start, stop = vocab_range(config, specs, rank, world)
    mine = {f"{k}_{i}": slice_block(config, f"{k}_{i}", blocks[f"{k}_{i}"], s)
            for i, s in enumerate(specs) for k in ("attn", "mlp")}
    if rank == 0:
        mine["input"] = blocks["input"]
    if (start, stop) == (0, config.vocab_size) or (rank == 0 and config.tie_word_embeddings):
        mine["output"] = blocks["output"]
    else:
        mine["output"] = slice_head(config, blocks["output"], blocks["input"], start, stop)
    return mine


def _master(config: ModelConfig, p: Participant) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    with torch.inference_mode():
        prefill = p.forward(_prompt(config), 0)
        decode = torch.cat([p.forward(torch.tensor([[t]]), 7 + i) for i, t in enumerate(DECODE)], dim=1)
    return prefill, decode, list(generate(p, _prompt(config)[0].tolist(), N_TOKENS))


def _run(config: ModelConfig, blocks: dict, layer_specs: list[list[ShardSpec]]) -> tuple:
    world = len(layer_specs[0])

    def build(coll: Collective) -> Participant:
        mine = [layer[coll.rank] for layer in layer_specs]
        vocab = vocab_range(config, mine, coll.rank, world)
        p = Participant(config, mine, InMemoryProvider(_head_blocks(config, blocks, mine, coll.rank, world)), coll,
                        max_seq_len=64, vocab=vocab)
        assert p.vocab[1] - p.vocab[0] < config.vocab_size or world == 1  # the head really is split
        return p

    if world == 1:
        return _master(config, build(LocalCollective()))
    return run_thread_group(world, build, lambda p: _master(config, p), timeout=60)


@pytest.fixture(scope="module")
def models() -> dict:
    out = {}
    for dtype in ("fp32", "int8"):
        for tied in (False, True):
            config = _config(tie_word_embeddings=tied)
            blocks = _blocks(config, seed=4)
            if dtype == "int8":
                blocks = {b: quantize_block(t, "int8") for b, t in blocks.items()}
            full = [[ShardSpec.full(config)]] * config.num_hidden_layers
            out[dtype, tied] = (config, blocks, _run(config, blocks, full))
    return out


@pytest.mark.parametrize("split", ["w2-even", "w2-uneven-zero", "w3-uneven", "w4-zero-rank"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_split_head_matches_one_device(models: dict, dtype: str, tied: bool, split: str) -> None:
    config, blocks, (ref_pre, ref_dec, ref_tokens) = models[dtype, tied]
    pre, dec, tokens = _run(config, blocks, [split_layer(config, g, f) for g, f in SPLITS[split]])
    assert pre.shape == ref_pre.shape and dec.shape == ref_dec.shape
    scale = ref_pre.abs().max()
    assert (pre - ref_pre).abs().max() / scale <= TOL
    assert (dec - ref_dec).abs().max() / ref_dec.abs().max() <= (TOL if dtype == "fp32" else DECODE_TOL)
    assert tokens == ref_tokens


def test_head_rows_that_do_not_fit_the_range_are_refused() -> None:
    config = _config()
    blocks = _blocks(config)
    full = [ShardSpec.full(config)] * config.num_hidden_layers
    mine = {**_head_blocks(config, blocks, full, 0, 1)}
    p = Participant(config, full, InMemoryProvider(mine), LocalCollective(), max_seq_len=16, vocab=(0, 100))
    with pytest.raises(ConfigError, match="holds 128 head rows"):
        p.forward(_prompt(config), 0)


# ---- distributed argmax ----------------------------------------------------------------------

def _cuts(v: int, world: int, seed: int) -> list[tuple[int, int]]:
    g = torch.Generator().manual_seed(seed)
    inner = sorted(torch.randperm(v - 1, generator=g)[:world - 1].add(1).tolist())
    edges = [0, *inner, v]
    return list(zip(edges[:-1], edges[1:]))


def _summaries(logits: torch.Tensor, cuts: list[tuple[int, int]], choice: Choice) -> list[torch.Tensor]:
    return [summarize(logits[a:b], a, choice) for a, b in cuts]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_distributed_argmax_is_torch_argmax_with_ties(world: int) -> None:
    greedy = Sampler(SamplingParams())
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        v = 40
        logits = torch.randint(-3, 4, (v,), generator=g).float()  # many ties, across rank borders
        cuts = _cuts(v, world, seed)
        got = decide(_summaries(logits, cuts, Choice()), Choice(), greedy, v)
        assert got == int(torch.argmax(logits)), (seed, cuts)
    flat = torch.zeros(v)
    assert decide(_summaries(flat, _cuts(v, world, 0), Choice()), Choice(), greedy, v) == 0


def test_summaries_that_do_not_tile_the_vocabulary_are_refused() -> None:
    logits = torch.randn(30)
    parts = _summaries(logits, [(0, 10), (12, 30)], Choice())
    with pytest.raises(ChoiceError, match="do not continue at row 10"):
        decide(parts, Choice(), Sampler(SamplingParams()), 30)
    with pytest.raises(ChoiceError, match="end at 30, not 40"):
        decide(_summaries(logits, [(0, 30)], Choice()), Choice(), Sampler(SamplingParams()), 40)


# ---- distributed sampler: the same distribution as Sampler on the whole logits ----------------

DRAWS = 20_000
V = 600
# (params, logits kind): pure temperature (rank by mass, pre-drawn token), top-k, top-p,
# both, a top-k whose threshold ties across ranks, and a flat top-p the candidates cannot decide.
CASES = {
    "temperature": (SamplingParams(temperature=0.7, seed=11), "peaked"),
    "top_k": (SamplingParams(temperature=1.3, top_k=40, seed=12), "peaked"),
    "top_p": (SamplingParams(temperature=0.9, top_p=0.8, seed=13), "peaked"),
    "top_k_top_p": (SamplingParams(temperature=1.0, top_k=100, top_p=0.7, seed=14), "peaked"),
    "top_k_ties": (SamplingParams(temperature=1.0, top_k=10, seed=15), "ties"),
    "top_p_flat": (SamplingParams(temperature=2.0, top_p=0.95, seed=16), "flat"),
}


def _logits(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    if kind == "peaked":  # an LLM-like next token: a few likely tokens, a long tail
        return torch.randn(V, generator=g) * 2.5
    if kind == "ties":
        return torch.randint(0, 6, (V,), generator=g).float()
    return torch.randn(V, generator=g) * 0.1


def _draw_many(logits: torch.Tensor, params: SamplingParams, cuts: list[tuple[int, int]],
               draws: int) -> tuple[torch.Tensor, int]:
    """Counts of ``draws`` tokens chosen the distributed way, and how many needed the whole logits."""
    sampler = Sampler(params)
    counts = torch.zeros(V, dtype=torch.long)
    full = 0
    for _ in range(draws):
        choice = Choice.for_step(sampler)
        tok = decide(_summaries(logits, cuts, choice), choice, sampler, V)
        if tok is None:
            full += 1
            tok = sampler(logits)
        counts[tok] += 1
    return counts, full


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_distributed_sampler_draws_from_the_sampler_distribution(case: str, world: int) -> None:
    """20k draws per case and W (~0.3 ms a draw: ~2.5 min CPU for all, hence ``slow``)."""
    _check_distribution(case, world, DRAWS)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("case", ["temperature", "top_k_top_p"])
def test_distributed_sampler_distribution_quick(case: str, world: int) -> None:
    """The same check with 2k draws, in the fast unit suite."""
    _check_distribution(case, world, 2_000)


def _check_distribution(case: str, world: int, draws: int) -> None:
    params, kind = CASES[case]
    logits = _logits(kind)
    cuts = _cuts(V, world, 7 + world)
    if world > 1:
        assert any(b - a > CANDIDATES for a, b in cuts)  # some rank holds rows it does not send
    want = Sampler(params).probs(logits).double()
    counts, full = _draw_many(logits, params, cuts, draws)
    freq = counts.double() / draws
    assert counts[want == 0].sum() == 0  # never a token the sampler excludes
    tv = 0.5 * (freq - want).abs().sum().item()
    # Chi-square over bins of expected count >= 5 (the rest pooled), at the 1e-4 level.
    exp = want * draws
    big = exp >= 5
    obs_b = torch.cat([counts[big].double(), counts[~big & (want > 0)].double().sum()[None]])
    exp_b = torch.cat([exp[big], exp[~big & (want > 0)].sum()[None]])
    keep = exp_b > 0
    stat = float(((obs_b[keep] - exp_b[keep]) ** 2 / exp_b[keep]).sum())
    df = int(keep.sum()) - 1
    assert stat < chi2.ppf(1 - 1e-4, df), (case, world, stat, df, tv)
    # Total variation of n draws over m live tokens is at most ~sqrt(m / (2π·n)) for a right sampler.
    live = int((want > 0).sum())
    assert tv < 3 * math.sqrt(live / (2 * math.pi * draws)) + 0.01, (case, world, tv)
    if kind == "peaked":
        assert full == 0  # decided by the candidates: no whole logits on the wire
    if kind == "flat" and world > 1:
        assert full == draws  # the nucleus lies among unsent tokens: the whole-logits path


def test_a_wrong_rank_weight_fails_the_distribution_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test above can fail: a sampler that picks ranks by size, not mass, is caught."""
    logits = _logits("peaked")
    cuts = _cuts(V, 3, 10)
    want = Sampler(CASES["temperature"][0]).probs(logits).double()
    sampler = Sampler(SamplingParams(temperature=0.7, seed=1))
    counts = torch.zeros(V, dtype=torch.long)
    for _ in range(4000):
        choice = Choice.for_step(sampler)
        parts = _summaries(logits, cuts, choice)
        r = int(torch.randint(0, 3, (1,), generator=sampler._gen))  # wrong: uniform over ranks
        counts[int(parts[r][4])] += 1
    tv = 0.5 * (counts.double() / 4000 - want).abs().sum().item()
    assert tv > 0.1


# ---- in a group: the choice on the wire ------------------------------------------------------

def test_sampled_generation_in_a_group_uses_the_choice_and_the_full_logit_fallback() -> None:
    config = _config()
    blocks = _blocks(config, seed=6)
    specs = [split_layer(config, g, f) for g, f in SPLITS["w3-uneven"]]
    world = 3

    def build(coll: Collective) -> Participant:
        mine = [layer[coll.rank] for layer in specs]
        return Participant(config, mine, InMemoryProvider(_head_blocks(config, blocks, mine, coll.rank, world)), coll,
                           max_seq_len=64, vocab=vocab_range(config, mine, coll.rank, world))

    def master(p: Participant) -> tuple[list[int], list[int], list[int], int]:
        prompt = _prompt(config)[0].tolist()
        a = list(generate(p, prompt, 12, SamplingParams(temperature=0.8, top_p=0.9, seed=5)))
        b = list(generate(p, prompt, 12, SamplingParams(temperature=0.8, top_p=0.9, seed=5)))
        before = p.full_logit_choices
        c = list(generate(p, prompt, 6, SamplingParams(temperature=50.0, top_p=0.99, seed=5)))  # flat: fallback
        return a, b, c, p.full_logit_choices - before

    a, b, c, fallbacks = run_thread_group(world, build, master, timeout=60)
    assert a == b and len(a) == 12 and all(0 <= t < config.vocab_size for t in a)
    assert len(c) == 6 and fallbacks == 6


def test_thread_and_local_gather() -> None:
    assert LocalCollective().gather(torch.ones(2))[0].tolist() == [1.0, 1.0]  # type: ignore[index]
    group = make_thread_group(3, timeout=10)
    out: list = [None] * 3

    def run(r: int) -> None:
        out[r] = group[r].gather(torch.full((r + 1,), float(r)), root=1)

    import threading
    ts = [threading.Thread(target=run, args=(r,)) for r in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert out[0] is None and out[2] is None
    assert [p.tolist() for p in out[1]] == [[0.0], [1.0, 1.0], [2.0, 2.0, 2.0]]


# ---- planning: every rank's head rows are counted --------------------------------------------

@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_planned_head_bytes_are_the_slices_bytes(tied: bool, int8: bool) -> None:
    from edgemesh.placement.memory import participant_blocks

    config = _config(tie_word_embeddings=tied)
    blocks = _blocks(config)
    if int8:
        blocks = {b: quantize_block(t, "int8") for b, t in blocks.items()}
    specs = [split_layer(config, g, f) for g, f in SPLITS["w3-uneven"]]
    for r in range(3):
        mine = [layer[r] for layer in specs]
        planned = participant_blocks(config, mine, r, 1 if int8 else 4, 3)
        real = _head_blocks(config, blocks, mine, r, 3)
        names = [n for n, _ in planned]
        assert "output" in names and ("input" in names) == (r == 0)
        for name, nbytes in planned:
            if name in ("input", "output"):
                assert nbytes == sum(t.numel() * t.element_size() for t in real[name].values()), (r, name)


def test_the_plan_gives_every_rank_head_rows_and_counts_them() -> None:
    from edgemesh.placement.devices import Device
    from edgemesh.placement.plan import Sizes, plan

    config = ModelConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         num_hidden_layers=30, vocab_size=49152, tie_word_embeddings=True)
    p = plan(config, [Device("a", 60, 4 << 30), Device("b", 30, 4 << 30), Device("c", 30, 4 << 30)], context_len=256)
    sz = Sizes.of(config, 256, 4)
    rows = [b - a for a, b in (vocab_range(config, p.specs_for(k), k, 3) for k in range(3))]
    assert sum(rows) == config.vocab_size and rows[0] > rows[1] > 0  # the faster master holds more
    for k, d in enumerate(p.devices):
        decoder = (d.kv_groups * sz.group_bytes + d.mlp_rows * sz.row_bytes
                   + config.num_hidden_layers * sz.layer_fixed_bytes)
        assert d.weight_bytes == decoder + rows[k] * 576 * 4 + (sz.master_bytes if k == 0 else 0)
