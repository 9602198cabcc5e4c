"""Store round trip, stable slice hashes, corruption detection, HF import/export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edgemesh.errors import ConfigError
from edgemesh.weights.config import ModelConfig
from edgemesh.weights.hf_import import export_hf, import_hf
from edgemesh.weights.shard import ShardSpec, slice_block
from edgemesh.weights.store import IntegrityError, ModelStore
from edgemesh.weights.synth import random_block, synth_model

pytestmark = pytest.mark.unit

CFG = ModelConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, vocab_size=50, qkv_bias=True)


def test_synth_round_trip(tmp_path: Path) -> None:
    seen: list[str] = []
    store = ModelStore(tmp_path)
    entry = synth_model(store, CFG, seed=7, name="tiny", progress=lambda d, t, w: seen.append(w))
    assert seen == CFG.block_names()
    again = store.get("tiny")
    assert again.config == CFG and again.id == entry.id
    assert store.get(entry.id[:12]).name == "tiny"
    for block in CFG.block_names():
        got = again.load_block(block)
        want = random_block(CFG, block, 7)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert [e.name for e in store.list()] == ["tiny"]
    # The id is a content address: same weights under another name, same id; other seed, other id.
    assert synth_model(store, CFG, seed=7, name="twin").id == entry.id
    assert synth_model(store, CFG, seed=8, name="other").id != entry.id


def test_slice_hash_stable_and_verified(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    entry = synth_model(store, CFG, seed=1, name="m")
    spec = ShardSpec((1,), 10, 30, False)
    a = entry.slice("attn_0", spec)
    (tmp_path / "m" / a.name).unlink()  # regenerate from scratch: same bytes, same hash
    b = entry.slice("attn_0", spec)
    assert a == b
    other = entry.slice("attn_0", ShardSpec((0,), 0, 10, True))
    assert other.sha256 != a.sha256
    tensors = entry.load_slice(a)
    assert tensors["wq"].shape == (2 * CFG.head_dim, CFG.hidden_size)
    assert torch.equal(tensors["wq"], entry.load_block("attn_0")["wq"][2 * CFG.head_dim:])
    assert torch.equal(tensors["bk"], entry.load_block("attn_0")["bk"][CFG.head_dim:])
    mlp = entry.load_slice(entry.slice("mlp_1", spec))
    assert torch.equal(mlp["w_down"], entry.load_block("mlp_1")["w_down"][:, 10:30])


def test_corruption_is_detected(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    entry = synth_model(store, CFG, seed=1, name="m")
    path = entry.path("mlp_0")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # same size, one flipped byte inside a tensor
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="mlp_0.safetensors: sha256 .* does not match"):
        entry.load_block("mlp_0")
    with pytest.raises(IntegrityError):
        store.get("m").verify()
    path.write_bytes(bytes(data[:-1]))
    with pytest.raises(IntegrityError, match="bytes, expected"):
        entry.load_block("mlp_0")
    entry.load_block("attn_0")  # the others are fine


def test_slice_with_nothing_is_empty() -> None:
    block = random_block(CFG, "attn_0", 0)
    s = slice_block(CFG, "attn_0", block, ShardSpec((), 0, 0, False))
    assert s["wq"].shape == (0, CFG.hidden_size) and s["wo"].shape == (CFG.hidden_size, 0)
    with pytest.raises(ConfigError):
        slice_block(CFG, "attn_0", block, ShardSpec((2,), 0, 0, False))


def test_unknown_model_lists_names(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    synth_model(store, CFG, seed=0, name="alpha")
    with pytest.raises(ConfigError, match="have: alpha"):
        store.get("beta")


def test_hf_export_import_round_trip(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    entry = synth_model(store, CFG, seed=3, name="src")
    export_hf(entry, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "qwen2"
    back = import_hf(store, tmp_path / "hf", name="back")
    assert back.config == CFG
    for block in CFG.block_names():
        a, b = entry.load_block(block), back.load_block(block)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hf_import_refuses_pickles(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_hf()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ConfigError, match="safetensors only"):
        import_hf(ModelStore(tmp_path / "s"), tmp_path)
