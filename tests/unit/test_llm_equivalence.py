"""A split model computes what the single-device model computes (ALGORITHMS §1 bar)."""

from __future__ import annotations

import pytest
import torch

from edgemesh.collective.base import Collective, LocalCollective
from edgemesh.llm.generate import generate
from edgemesh.llm.model import Participant
from edgemesh.llm.threaded import run_thread_group
from edgemesh.weights.config import ModelConfig
from edgemesh.weights.provider import InMemoryProvider
from edgemesh.weights.shard import ShardSpec, check_layer_cover, slice_block, split_layer
from edgemesh.weights.synth import random_block

pytestmark = pytest.mark.unit

TOL = 1e-5
N_TOKENS = 32


def _config(**kw: object) -> ModelConfig:
    base = dict(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=4,
                num_hidden_layers=3, vocab_size=128, max_position_embeddings=256, rope_theta=10000.0)
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


def _blocks(config: ModelConfig, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    return {b: random_block(config, b, seed) for b in config.block_names()}


def _rank_blocks(config: ModelConfig, blocks: dict[str, dict[str, torch.Tensor]],
                 specs: list[ShardSpec], rank: int) -> dict[str, dict[str, torch.Tensor]]:
    """Rank ``rank``'s slices of every decoder block (plus input/output on rank 0)."""
    mine: dict[str, dict[str, torch.Tensor]] = {}
    for i, spec in enumerate(specs):
        for kind in ("attn", "mlp"):
            name = f"{kind}_{i}"
            mine[name] = slice_block(config, name, blocks[name], spec)
    if rank == 0:
        mine["input"], mine["output"] = blocks["input"], blocks["output"]
    return mine


def _rank_provider(config: ModelConfig, blocks: dict[str, dict[str, torch.Tensor]],
                   specs: list[ShardSpec], rank: int) -> InMemoryProvider:
    return InMemoryProvider(_rank_blocks(config, blocks, specs, rank))


def _prompt(config: ModelConfig) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(5))


def _reference(config: ModelConfig, blocks: dict[str, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, list[int]]:
    full = [ShardSpec.full(config)] * config.num_hidden_layers
    model = Participant(config, full, _rank_provider(config, blocks, full, 0), LocalCollective(), max_seq_len=64)
    with torch.inference_mode():
        logits = model.forward(_prompt(config), 0)
    tokens = list(generate(model, _prompt(config)[0].tolist(), N_TOKENS))
    return logits, tokens


def _split_run(config: ModelConfig, blocks: dict[str, dict[str, torch.Tensor]],
               layer_specs: list[list[ShardSpec]]) -> tuple[torch.Tensor, list[int]]:
    """layer_specs[i][r] = rank r's spec of layer i."""
    world = len(layer_specs[0])
    for specs in layer_specs:
        check_layer_cover(config, specs)

    def build(coll: Collective) -> Participant:
        mine = [layer[coll.rank] for layer in layer_specs]
        return Participant(config, mine, _rank_provider(config, blocks, mine, coll.rank), coll, max_seq_len=64)

    def master(p: Participant) -> tuple[torch.Tensor, list[int]]:
        with torch.inference_mode():
            logits = p.forward(_prompt(config), 0)
        return logits, list(generate(p, _prompt(config)[0].tolist(), N_TOKENS))

    return run_thread_group(world, build, master, timeout=60)


def _assert_same(ref: tuple[torch.Tensor, list[int]], got: tuple[torch.Tensor, list[int]]) -> float:
    rel = ((got[0] - ref[0]).abs().max() / ref[0].abs().max()).item()
    assert rel <= TOL, f"max|Δ|/max|logit| = {rel:.3e} > {TOL}"
    assert got[1] == ref[1]
    return rel


# Per-layer (groups per rank, MLP rows per rank); 4 KV groups, 96 MLP rows, 3 layers.
SPLITS = {
    "w1": [([4], [96])] * 3,
    "w2-even": [([2, 2], [48, 48])] * 3,
    "w2-uneven-zero": [([3, 1], [90, 6]), ([4, 0], [0, 96]), ([1, 3], [96, 0])],
    "w3-uneven": [([2, 1, 1], [50, 30, 16]), ([1, 2, 1], [32, 32, 32]), ([0, 1, 3], [10, 0, 86])],
    "w4-even": [([1, 1, 1, 1], [24, 24, 24, 24])] * 3,
    "w4-zero-rank": [([2, 1, 1, 0], [40, 30, 26, 0]), ([0, 2, 1, 1], [0, 50, 0, 46]), ([1, 1, 1, 1], [1, 1, 1, 93])],
}


@pytest.fixture(scope="module")
def gqa() -> tuple[ModelConfig, dict[str, dict[str, torch.Tensor]], tuple[torch.Tensor, list[int]]]:
    config = _config()
    blocks = _blocks(config, seed=1)
    return config, blocks, _reference(config, blocks)


@pytest.mark.parametrize("split", list(SPLITS))
def test_split_matches_single_device(split: str, gqa) -> None:  # type: ignore[no-untyped-def]
    config, blocks, ref = gqa
    specs = [split_layer(config, g, f) for g, f in SPLITS[split]]
    _assert_same(ref, _split_run(config, blocks, specs))


def test_non_contiguous_groups_match() -> None:
    config = _config()
    blocks = _blocks(config, seed=2)
    ref = _reference(config, blocks)
    layer = [ShardSpec((0, 3), 0, 40, True), ShardSpec((1, 2), 40, 96, False)]
    _assert_same(ref, _split_run(config, blocks, [layer] * 3))


@pytest.mark.parametrize("variant", ["qkv_bias", "llama_bias", "tied", "mha", "rope_llama3", "rope_linear"])
def test_variants_match_on_three_ranks(variant: str) -> None:
    kw: dict[str, object] = {
        "qkv_bias": {"qkv_bias": True},
        "llama_bias": {"qkv_bias": True, "o_bias": True, "mlp_bias": True},
        "tied": {"tie_word_embeddings": True},
        "mha": {"num_key_value_heads": 8},
        "rope_llama3": {},
        "rope_linear": {},
    }[variant]
    config = _config(**kw)
    if variant.startswith("rope_"):
        from edgemesh.weights.config import RopeScaling

        sc = (RopeScaling("llama3", 8.0, 1.0, 4.0, 32) if variant == "rope_llama3" else RopeScaling("linear", 2.0))
        config = _config(rope_scaling=sc)
    blocks = _blocks(config, seed=3)
    ref = _reference(config, blocks)
    n = config.num_key_value_heads
    groups = [n - 2 * (n // 4), n // 4, n // 4]
    specs = [split_layer(config, groups, [40, 0, 56])] * config.num_hidden_layers
    _assert_same(ref, _split_run(config, blocks, specs))
    if variant == "tied":
        assert "lm_head" not in blocks["output"]


def test_chunked_prefill_equals_one_shot() -> None:
    config = _config()
    blocks = _blocks(config, seed=4)
    full = [ShardSpec.full(config)] * config.num_hidden_layers
    model = Participant(config, full, _rank_provider(config, blocks, full, 0), LocalCollective(), max_seq_len=64)
    prompt = _prompt(config)
    with torch.inference_mode():
        one = model.forward(prompt, 0)
        a = model.forward(prompt[:, :3], 0)
        b = model.forward(prompt[:, 3:], 3)
    both = torch.cat([a, b], dim=1)
    assert (both - one).abs().max().item() <= 1e-5 * one.abs().max().item()
