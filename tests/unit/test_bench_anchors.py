"""`bench anchors`: option checks and the same-run ratios (the external systems are not run here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgemesh.bench.anchors import _PRED, AnchorOptions, summarize
from edgemesh.errors import ConfigError

pytestmark = pytest.mark.unit


def test_options_need_whole_anchor_setups(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="together"):
        AnchorOptions(dllama=tmp_path / "dllama").check()
    with pytest.raises(ConfigError, match="together"):
        AnchorOptions(llama_bench=tmp_path / "llama-bench").check()
    with pytest.raises(ConfigError, match="no such file"):
        AnchorOptions(llama_bench=tmp_path / "llama-bench", gguf=tmp_path / "m.gguf").check()
    with pytest.raises(ConfigError):
        AnchorOptions(nodes=1).check()
    AnchorOptions().check()  # edgemesh alone is a valid run


def test_dllama_token_lines_are_parsed() -> None:
    line = "🔶 Pred   11 ms Sync   13 ms | Sent    76 kB Recv   199 kB | The"
    assert [tuple(map(int, m)) for m in _PRED.findall(line)] == [(11, 13, 76, 199)]


def test_summary_takes_medians_and_ratios_to_dllama_of_the_same_run() -> None:
    rows = {
        "edgemesh:m": [{"ms_per_token": 30.0, "single_ms_per_token": 20.0}, {"ms_per_token": 50.0, "single_ms_per_token": 22.0},
                       {"ms_per_token": 40.0, "single_ms_per_token": 21.0}],
        "dllama:1": [{"ms_per_token": 20.0}, {"ms_per_token": 21.0}, {"ms_per_token": 19.0}],
        "dllama:3": [{"ms_per_token": 25.0}, {"ms_per_token": 26.0}, {"ms_per_token": 24.0}],
    }
    out = summarize(rows, AnchorOptions(nodes=3))
    em = out["systems"]["edgemesh:m"]
    assert em["ms_per_token"] == 40.0 and em["single_ms_per_token"] == 21.0
    assert em["single_vs_dllama_1"] == round(21.0 / 20.0, 2)
    assert em["nodes_vs_dllama_3"] == round(40.0 / 25.0, 2)
