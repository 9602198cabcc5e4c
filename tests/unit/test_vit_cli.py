"""`edgemesh vit train|split|eval` end to end through the typer app (tiny: 1 epoch, 300 images)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgemesh.cli import _register, app
from edgemesh.errors import ConfigError

pytestmark = pytest.mark.unit


def test_train_split_eval_in_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEMESH_HOME", str(tmp_path))
    _register()
    run = CliRunner().invoke
    r = run(app, ["vit", "train", "--dataset", "digits", "--epochs", "1", "--limit", "300"])
    assert r.exit_code == 0, r.output
    vit_dir = tmp_path / "models" / "vit"
    assert (vit_dir / "vit-digits" / "model.json").is_file()
    r = run(app, ["vit", "split", "vit-digits", "--parts", "2", "--epochs", "1", "--limit", "300",
                  "--devices", str(Path(__file__).parents[2] / "nodes" / "pi*.toml")])
    assert r.exit_code == 0, r.output
    manifest = json.loads((vit_dir / "vit-digits-split2" / "manifest.json").read_text())
    assert len(manifest["parts"]) == 2 and {a["device"] for a in manifest["placement"]["assignments"]} <= {"pi4", "pi5"}
    out = tmp_path / "eval.json"
    r = run(app, ["vit", "eval", "vit-digits-split2", "--repeats", "3", "--json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert set(res["fused_acc_without"]) == {"part0", "part1"}
    assert res["params_max_part"] <= res["params_full"] / 2 and res["latency_split_ms"] > 0
    r = run(app, ["vit", "eval", "missing-split"])
    assert isinstance(r.exception, ConfigError) and "vit split" in str(r.exception)
