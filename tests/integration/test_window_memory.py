"""Memory really bounded: a member process streaming its weights through a window peaks near
the predictor's figure and far below the all-in-memory process, and leaves no page cache."""

from __future__ import annotations

import pytest

from edgemesh.bench.window import BenchOptions, _run, _summary, shape_for
from edgemesh.weights.shard import ShardSpec, split_layer
from edgemesh.weights.store import ModelStore
from edgemesh.weights.synth import synth_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MB = 1e6


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    config = shape_for(240 * 10**6).config()  # blocks of ~10-25 MB: weights well above the noise
    return synth_model(ModelStore(tmp_path_factory.mktemp("store")), config, seed=3)


@pytest.mark.parametrize("world", [1, 2])
def test_peak_rss_is_predicted_and_bounded(model, world: int) -> None:  # type: ignore[no-untyped-def]
    from edgemesh.llm.build import rank_files

    config = model.config
    if world == 1:
        layers = [[ShardSpec.full(config)]] * config.num_hidden_layers
    else:
        k, f = config.num_key_value_heads, config.intermediate_size
        layers = [split_layer(config, [k // 2, k - k // 2], [f // 2, f - f // 2])] * config.num_hidden_layers
    specs = [[layer[r] for layer in layers] for r in range(world)]
    paths = [{b: model.root / ref.name for b, ref in rank_files(model, specs[r], r, world).items()} for r in range(world)]
    opts = BenchOptions(tokens=3, prompt_tokens=8)
    mem = _summary(_run(opts, config, specs, paths, 0, True, 4), "memory", 0, "memory")
    win = _summary(_run(opts, config, specs, paths, 2, True, 4), "window", 2, "cold")
    assert "error" not in mem and "error" not in win, (mem.get("error"), win.get("error"))
    assert win["tokens"] == mem["tokens"]
    for r in range(world):
        for run in (mem, win):
            assert run["peak_rss_mb"][r] <= 1.2 * run["predicted_peak_mb"][r], run
        # the window saves most of the weights: all of them but ~2 blocks
        saved = mem["peak_rss_mb"][r] - win["peak_rss_mb"][r]
        assert saved >= 0.6 * (win["weights_mb"][r] - (win["predicted_peak_mb"][r] - win["baseline_mb"][r])), (mem, win)
        assert win["stats"][r]["max_resident_blocks"] <= 2
        if win["page_cache_mb"][r] is not None:  # DONTNEED after every read: nothing of ours stays cached
            assert win["page_cache_mb"][r] < 0.1 * win["weights_mb"][r]
