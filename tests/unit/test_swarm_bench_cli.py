"""`edgemesh bench swarm` end to end on a small question file: registration, table, JSON keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def test_bench_swarm_cli_writes_the_documented_keys(tmp_path):
    rows = [{"question": f"What is {k} + {k}?", "answer_a": str(2 * k), "answer_b": str(2 * k + 1),
             "answer_c": str(k), "answer_d": str(3 * k), "correct_answer": "A", "topic": "arithmetic"}
            for k in range(80)]
    data = tmp_path / "mmlu.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "swarm.json"
    env = {**os.environ, "EDGEMESH_MMLU": str(data), "COLUMNS": "160"}
    cmd = [sys.executable, "-m", "edgemesh.cli", "bench", "swarm", "--dataset", "mmlu", "--nodes", "5", "--simulated",
           "--questions", "10", "--adversaries", "1", "--seed", "3", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "majority vote" in proc.stdout and "BT swarm" in proc.stdout
    r = json.loads(out.read_text())
    for key in ("acc_swarm", "acc_majority", "acc_best_single", "acc_swarm_adversarial", "acc_majority_adversarial"):
        assert 0.0 <= r[key] <= 1.0
    assert r["questions"] == 10 and r["nodes"] == 5 and r["adversaries"] == 1 and r["seed"] == 3
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode == 0 and json.loads(out.read_text()) == r  # fixed seed: same figures


def test_bench_swarm_needs_a_member_kind_and_names_missing_data(tmp_path):
    env = {**os.environ, "EDGEMESH_MMLU": str(tmp_path / "missing.jsonl")}
    base = [sys.executable, "-m", "edgemesh.cli", "bench", "swarm", "--questions", "5"]
    proc = subprocess.run(base, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0 and "--simulated" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(base + ["--simulated"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0 and "no such file" in proc.stderr and "Traceback" not in proc.stderr
