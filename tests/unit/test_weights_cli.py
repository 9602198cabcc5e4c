"""`edgemesh model synth|list` and `edgemesh plan` end to end through the typer app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgemesh.cli import _register, app
from edgemesh.errors import ConfigError

pytestmark = pytest.mark.unit


def test_synth_list_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEMESH_HOME", str(tmp_path))
    _register()
    run = CliRunner().invoke
    r = run(app, ["model", "synth", "--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2",
                  "--ffn", "96", "--vocab", "100", "--name", "tiny", "--json", "-"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "models" / "tiny" / "manifest.json").is_file()
    r = run(app, ["model", "list", "--json", "-"])
    listed = json.loads(r.stdout)
    assert [m["name"] for m in listed] == ["tiny"] and listed[0]["layers"] == 2
    r = run(app, ["plan", "tiny", "--nodes", "2", "--json", "-"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert len(p["devices"]) == 2 and len(p["layers"]) == 2
    assert sum(d["mlp_rows"] for d in p["devices"]) == 2 * 96
    # --json FILE: the same JSON in the file, the table on stdout (one convention for every command).
    out = tmp_path / "plan.json"
    r = run(app, ["plan", "tiny", "--nodes", "2", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text()) == p and "rank" in r.stdout
    r = run(app, ["plan", "missing"])
    assert isinstance(r.exception, ConfigError) and "no model 'missing'" in str(r.exception)
