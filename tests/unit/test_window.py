"""The sliding-window provider computes exactly what the all-in-memory one does, and keeps its bound."""

from __future__ import annotations

import errno
import gc
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgemesh.collective.base import Collective, LocalCollective
from edgemesh.errors import ConfigError, EdgemeshError
from edgemesh.llm.generate import generate
from edgemesh.llm.model import Participant
from edgemesh.llm.threaded import run_thread_group
from edgemesh.weights.config import ModelConfig
from edgemesh.weights.provider import InMemoryProvider
from edgemesh.weights.quant import quantize_block
from edgemesh.weights.shard import ShardSpec, split_layer
from edgemesh.weights.store import write_tensors
from edgemesh.weights.synth import random_block
from tests.unit.test_llm_equivalence import _rank_blocks
from edgemesh.weights import window
from edgemesh.weights.window import WeightLoadError, WindowedProvider, execution_order, read_safetensors

pytestmark = pytest.mark.unit

N_TOKENS = 12
TOL = 1e-6


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    # Tiny matmuls: intra-op threads only spin against the loader thread (10x slower on 2 busy cores).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(**kw: object) -> ModelConfig:
    base = dict(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=4,
                num_hidden_layers=3, vocab_size=128, max_position_embeddings=256, rope_theta=10000.0)
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


def _blocks(config: ModelConfig, seed: int, int8: bool) -> dict[str, dict[str, torch.Tensor]]:
    blocks = {b: random_block(config, b, seed) for b in config.block_names()}
    return {b: quantize_block(t, "int8") for b, t in blocks.items()} if int8 else blocks


def _write(root: Path, mine: dict[str, dict[str, torch.Tensor]]) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    return {b: (write_tensors(root / f"{b}.safetensors", t, b) and root / f"{b}.safetensors") for b, t in mine.items()}


def _prompt(config: ModelConfig) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(5))


def _master_run(config: ModelConfig, p: Participant) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    with torch.inference_mode():
        prefill = p.forward(_prompt(config), 0)
        decode = torch.cat([p.forward(torch.tensor([[t]]), 7 + i) for i, t in enumerate((3, 17, 42))], dim=1)
    return prefill, decode, list(generate(p, _prompt(config)[0].tolist(), N_TOKENS))


def _run(config, blocks, layer_specs, tmp: Path | None, window: int):  # type: ignore[no-untyped-def]
    """layer_specs[i][r]; ``window`` 0 = all in memory, else a WindowedProvider over files in ``tmp``."""
    world = len(layer_specs[0])
    providers: list[WindowedProvider] = []

    def provider(rank: int):  # type: ignore[no-untyped-def]
        mine = [layer[rank] for layer in layer_specs]
        rb = _rank_blocks(config, blocks, mine, rank)
        if window == 0:
            return InMemoryProvider(rb)
        assert tmp is not None
        p = WindowedProvider(_write(tmp / f"rank{rank}", rb), execution_order(config, rank), window, name=str(rank))
        providers.append(p)
        return p

    def build(coll: Collective) -> Participant:
        return Participant(config, [layer[coll.rank] for layer in layer_specs], provider(coll.rank), coll, max_seq_len=64)

    try:
        if world == 1:
            out = _master_run(config, build(LocalCollective()))
        else:
            out = run_thread_group(world, build, lambda p: _master_run(config, p), timeout=60)
        for p in providers:
            s = p.stats()
            assert s.max_resident_blocks <= window
            assert s.tokens > N_TOKENS
        return out
    finally:
        for p in providers:
            p.close()


def _same(ref, got) -> None:  # type: ignore[no-untyped-def]
    for a, b in zip(ref[:2], got[:2]):
        assert (b - a).abs().max().item() <= TOL
    assert got[2] == ref[2]


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize("world", [1, 2])
def test_window_equals_all_in_memory(world: int, int8: bool, tmp_path: Path) -> None:
    config = _config()
    blocks = _blocks(config, 1, int8)
    specs = [[ShardSpec.full(config)]] * 3 if world == 1 else [split_layer(config, [3, 1], [40, 56])] * 3
    ref = _run(config, blocks, specs, None, 0)
    for w in (2, 3):
        _same(ref, _run(config, blocks, specs, tmp_path / f"w{w}", w))


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_tied_head_window(int8: bool, tmp_path: Path) -> None:
    config = _config(tie_word_embeddings=True)
    blocks = _blocks(config, 2, int8)
    specs = [split_layer(config, [2, 2], [48, 48])] * 3
    ref = _run(config, blocks, specs, None, 0)
    _same(ref, _run(config, blocks, specs, tmp_path, 2))


def test_reader_matches_safetensors(tmp_path: Path) -> None:
    # odd sizes put later tensors at unaligned file offsets; the reader must still give aligned tensors
    t = {"a": torch.randint(-127, 127, (3, 5), dtype=torch.int8), "a.scale": torch.rand(3),
         "b": torch.randn(7).to(torch.bfloat16), "c": torch.randn(2, 3, 4), "empty": torch.zeros(0, 4)}
    write_tensors(tmp_path / "x.safetensors", t, "x")
    got = read_safetensors(tmp_path / "x.safetensors")
    ref = load_file(str(tmp_path / "x.safetensors"))
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k])
        assert got[k].data_ptr() % 16 == 0 or got[k].numel() == 0
    (tmp_path / "bad.safetensors").write_bytes(b"\x01")
    with pytest.raises(WeightLoadError):
        read_safetensors(tmp_path / "bad.safetensors")


def _spy_direct(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record whether each ``_read_direct`` call read the block (True) or gave up (False)."""
    calls: list[bool] = []
    real = window._read_direct

    def spy(*a, **kw):  # type: ignore[no-untyped-def]
        got = real(*a, **kw)
        calls.append(got is not None)
        return got

    monkeypatch.setattr(window, "_read_direct", spy)
    monkeypatch.setattr(window, "_direct_ok", True)
    return calls


def _check_same(got: dict[str, torch.Tensor], path: Path) -> None:
    ref = load_file(str(path))
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
        assert got[k].numel() == 0 or got[k].data_ptr() % 64 == 0, k


def test_store_files_are_read_with_o_direct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy_direct(monkeypatch)
    # one odd-sized tensor: the writer puts it last, so every tensor stays 64-byte aligned
    t = {"w": torch.randint(-127, 127, (96, 64), dtype=torch.int8), "w.scale": torch.rand(96),
         "norm": torch.randn(5), "empty": torch.zeros(0, 4), "big": torch.randn(300, 1000)}
    path = tmp_path / "x.safetensors"
    write_tensors(path, t, "x")
    got, buf = window.read_block(path)
    assert calls == [True]
    _check_same(got, path)
    assert buf is not None and len(buf) % 4096 == 0 and len(buf) <= path.stat().st_size
    assert window.block_memory(path) >= len(buf)
    # without dropping the cache (the page-cache runs) reads stay buffered
    _check_same(window.read_block(path, drop_cache=False)[0], path)
    assert calls == [True]


def test_unaligned_files_and_refusing_filesystems_fall_back_to_buffered_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy_direct(monkeypatch)
    odd = tmp_path / "odd.safetensors"  # safetensors' own writer: tensors at arbitrary offsets
    save_file({"a": torch.randn(3), "b": torch.randn(64, 64)}, str(odd))
    _check_same(window.read_block(odd)[0], odd)
    assert calls == []  # not laid out for direct reads: never tried
    two_odd = tmp_path / "two.safetensors"  # the second odd-sized tensor cannot be aligned
    write_tensors(two_odd, {"a": torch.randn(3), "b": torch.randn(5), "c": torch.randn(64)}, "two")
    _check_same(window.read_block(two_odd)[0], two_odd)
    assert calls == []

    good = tmp_path / "good.safetensors"
    write_tensors(good, {"w": torch.randn(64, 64)}, "good")
    real_open = window.os.open

    def no_direct(path, flags, *a):  # type: ignore[no-untyped-def]
        if flags & window.os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")  # what tmpfs says
        return real_open(path, flags, *a)

    monkeypatch.setattr(window.os, "open", no_direct)
    _check_same(window.read_block(good)[0], good)
    assert calls == [False] and window._direct_ok is False
    _check_same(window.read_block(good)[0], good)
    assert calls == [False]  # not tried again


def _toy(tmp_path: Path, n: int = 5, size: int = 1000) -> tuple[dict[str, Path], list[str]]:
    order = [f"attn_{i // 2}" if i % 2 == 0 else f"mlp_{i // 2}" for i in range(n)]
    files = {b: tmp_path / f"{b}.safetensors" for b in order}
    for i, b in enumerate(order):
        write_tensors(files[b], {"w": torch.full((size,), float(i))}, b)
    return files, order


def test_released_blocks_are_freed_and_window_is_bounded(tmp_path: Path) -> None:
    files, order = _toy(tmp_path)
    with WindowedProvider(files, order, 2) as p:
        refs = []
        for _ in range(3):
            for i, b in enumerate(order):
                w = p.get(b)
                assert w["w"][0].item() == float(i)
                refs.append(weakref.ref(w["w"]))
                del w
                p.release(b)
        # every block but the (at most 2) prefetched ones is gone: no cache keeps them
        deadline = time.monotonic() + 10
        while sum(r() is not None for r in refs) > 0 and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.01)
        assert sum(r() is not None for r in refs) == 0
        assert p.stats().max_resident_blocks <= 2
        assert p.nbytes() <= 2 * max(p.block_nbytes().values())
        assert p.stats().tokens == 2


def test_out_of_order_get_resyncs(tmp_path: Path) -> None:
    files, order = _toy(tmp_path)
    with WindowedProvider(files, order, 2) as p:
        p.get(order[0])  # a forward that fails here: never released
        w = p.get(order[3])  # the next one starts elsewhere
        assert w["w"][0].item() == 3.0
        p.release(order[3])
        assert p.get(order[4])["w"][0].item() == 4.0
        p.release(order[4])
        with pytest.raises(ConfigError):
            p.get("mlp_99")


def test_close_stops_the_loader_and_errors_propagate(tmp_path: Path) -> None:
    files, order = _toy(tmp_path)
    p = WindowedProvider(files, order, 3, name="t")
    thread = p._thread
    p.close()
    assert not thread.is_alive()
    with pytest.raises(EdgemeshError):
        p.get(order[0])
    p.close()  # twice is fine
    files[order[2]].unlink()
    with pytest.raises(ConfigError):
        WindowedProvider(files, order, 1)
    before = threading.active_count()
    with pytest.raises(WeightLoadError):
        WindowedProvider(files, order, 2)  # the missing file is found before a thread starts
    assert threading.active_count() == before


def test_loader_failure_reaches_get(tmp_path: Path) -> None:
    files, order = _toy(tmp_path)
    with WindowedProvider(files, order, 2) as p:
        for b in order:
            p.get(b)
            p.release(b)
        files[order[3]].write_bytes(b"garbage")  # corrupt a block the loader reads on the next token
        with pytest.raises(WeightLoadError):
            for b in order * 2:
                p.get(b)
                p.release(b)


def test_stats_measure_compute_gap_and_disk(tmp_path: Path) -> None:
    files, order = _toy(tmp_path, n=6)
    with WindowedProvider(files, order, 2) as p:
        for _ in range(3):
            for b in order:
                p.get(b)
                time.sleep(0.004 if b.startswith("attn") else 0.002)
                p.release(b)
                time.sleep(0.001)  # the "allreduce"
        s = p.stats()
    assert s.tokens == 2
    assert s.t_a_ms >= 4 and s.t_f_ms >= 2 and s.t_a_ms > s.t_f_ms
    assert s.t_ar_ms >= 1
    assert s.tau_a_ms > 0 and s.tau_f_ms > 0 and s.bytes_read > 0
    assert s.no_stall is not None


def test_released_mappings_are_reused_without_clobbering_live_tensors(tmp_path: Path) -> None:
    files, order = _toy(tmp_path, n=6)
    with WindowedProvider(files, order, 2) as p:
        kept = p.get(order[0])["w"]  # the caller keeps a tensor past release: its mapping is not reused
        p.release(order[0])
        for _ in range(4):
            for i, b in enumerate(order):
                if (b, _) == (order[0], 0):
                    continue
                w = p.get(b)
                assert torch.equal(w["w"], torch.full((1000,), float(i)))
                del w
                p.release(b)
                if _ == 0:  # before order[0] is read again (with the same values)
                    assert torch.equal(kept, torch.full((1000,), 0.0))
        assert p.reused_mappings > 0  # equal-sized blocks read into released mappings
        assert p.nbytes() <= 2 * max(p.block_nbytes().values())


def test_kept_mappings_stay_within_the_window_bound(tmp_path: Path) -> None:
    # a big block (the embedding, say) among small ones: its mapping is not kept beside them
    order = ["input", "attn_0", "mlp_0", "attn_1", "mlp_1", "output"]
    sizes = {"input": 20000, "attn_0": 500, "mlp_0": 900, "attn_1": 500, "mlp_1": 900, "output": 20000}
    files = {b: tmp_path / f"{b}.safetensors" for b in order}
    for i, b in enumerate(order):
        write_tensors(files[b], {"w": torch.full((sizes[b],), float(i))}, b)
    limit = max(sum(files[order[(i + j) % 6]].stat().st_size for j in range(2)) for i in range(6))
    with WindowedProvider(files, order, 2) as p:
        for _ in range(3):
            for i, b in enumerate(order):
                w = p.get(b)
                assert w["w"][-1].item() == float(i)
                del w
                p.release(b)
                assert p.nbytes() <= limit
        assert p.stats().max_resident_bytes <= limit


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_untied_embedding_is_read_by_rows_not_windowed(int8: bool, tmp_path: Path) -> None:
    config = _config()
    blocks = _blocks(config, 3, int8)
    files = _write(tmp_path, {b: blocks[b] for b in ("input", "attn_0", "mlp_0", "attn_1", "mlp_1", "attn_2", "mlp_2",
                                                     "output")})
    order = execution_order(config, 0)
    assert "input" not in order and order[-1] == "output"
    table = blocks["input"]
    with WindowedProvider(files, order, 2) as p:
        # The loader fills the window (the first two blocks) on its own thread as soon as the
        # provider exists; wait for that, after which it reads nothing until a block is released,
        # so the count below moves by the rows' bytes alone.
        filled = sum(files[b].stat().st_size for b in order[:2])
        deadline = time.monotonic() + 30
        while p.stats().bytes_read < filled and time.monotonic() < deadline:
            time.sleep(0.01)
        before = p.stats().bytes_read
        assert before == filled
        ids = [5, 0, 127, 5]
        got = p.rows("input", ("embed", "embed.scale"), ids)
        assert got is not None and set(got) == ({"embed", "embed.scale"} if int8 else {"embed"})
        for name, t in got.items():
            assert torch.equal(t, table[name][ids])
        assert p.stats().bytes_read - before == sum(t.numel() * t.element_size() for t in got.values())
        assert p.rows("attn_0", ("wq",), [0]) is None  # a windowed block is taken whole
        with pytest.raises(ConfigError, match="out of range"):
            p.rows("input", ("embed",), [config.vocab_size])
        with pytest.raises(ConfigError):
            p.get("input")  # not in the window
    tied = _config(tie_word_embeddings=True)
    assert execution_order(tied, 0)[0] == execution_order(tied, 0)[-1] == "input"
    with WindowedProvider(files, execution_order(tied, 0), 2) as p:
        assert p.rows("input", ("embed",), [1]) is None  # windowed: its head rows are needed whole


@pytest.mark.parametrize("window_size", [2, 3, 4])
def test_alternating_block_sizes_reuse_mappings_for_any_window(tmp_path: Path, window_size: int) -> None:
    # attention and MLP blocks alternate in size; with an odd window the block read next is never
    # the size of the one just released: its mapping is resized instead of a fresh one faulted in
    order = [f"{k}_{i}" for i in range(4) for k in ("attn", "mlp")]
    files = {b: tmp_path / f"{b}.safetensors" for b in order}
    for i, b in enumerate(order):
        write_tensors(files[b], {"w": torch.full((3000 if b.startswith("attn") else 9000,), float(i))}, b)
    with WindowedProvider(files, order, window_size) as p:
        limit = p._keep_limit
        for _ in range(3):
            for i, b in enumerate(order):
                w = p.get(b)
                assert w["w"].numel() == (3000 if b.startswith("attn") else 9000) and w["w"][-1].item() == float(i)
                del w
                p.release(b)
                assert p.nbytes() <= limit
        loads = 3 * len(order)
        assert p.reused_mappings >= loads - 2 * len(order)  # from the second pass on, every read reuses
        assert p.stats().max_resident_bytes <= limit
