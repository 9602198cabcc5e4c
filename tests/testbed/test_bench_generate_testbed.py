"""`edgemesh bench generate MODEL --testbed lan-4`: the benchmark on a testbed's devices, as a
user runs it. It brings the scenario up, starts the daemons, copies the model into dev1's store,
measures there, and leaves nothing behind; across namespaces the group's cost model takes the
measured links (a hop of a millisecond or more), not loopback's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgemesh.collective.costmodel import LOOPBACK_CURVE
from edgemesh.weights.config import ModelConfig
from edgemesh.weights.store import ModelStore
from edgemesh.weights.synth import synth_model

from .conftest import REPO

pytestmark = [pytest.mark.testbed, pytest.mark.slow, pytest.mark.timeout(900)]


def _ours() -> set[str]:
    """Namespaces and run directories a GenerateBed names (prefix "bg")."""
    found = {f"netns:{p.name}" for p in Path("/run/netns").glob("bg*-*")} if Path("/run/netns").exists() else set()
    run = Path("/run/edgemesh-testbed")
    return found | ({f"run:{p.name}" for p in run.glob("bg*")} if run.exists() else set())


def test_bench_generate_on_lan4_measures_across_devices_and_cleans_up(tmp_path: Path) -> None:
    store = tmp_path / "store"
    # Small enough to be quick at 0.5 core; a context that holds the 256-token prefill.
    entry = synth_model(ModelStore(store), ModelConfig(128, 256, 4, 2, 2, 512, max_position_embeddings=2048), seed=3)
    before = _ours()
    res = subprocess.run([sys.executable, "-m", "edgemesh.cli", "bench", "generate", entry.name, "--store", str(store),
                          "--testbed", str(REPO / "emulation" / "lan-4.toml"), "--nodes", "2", "--tokens", "4",
                          "--json", "-"], capture_output=True, text=True, timeout=800)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    r = json.loads(res.stdout)
    assert r["testbed"] == {"scenario": "lan-4", "devices": ["dev1", "dev2"]}
    assert r["nodes"] == 2 and r["ms_per_token"] > 0 and r["single_ms_per_token"] > 0
    assert r["prefill_ms"] > 0 and r["single_prefill_ms"] > 0
    assert len(r["prefill_ms_by_rank"]) == 2 and all(v > 0 for v in r["prefill_ms_by_rank"])
    # lan-4's devices are 2 ms apart (round trip): a hop costs at least 1 ms, and a decode
    # step's message takes the one-hop direct allreduce.
    assert r["link_cost"]["hop_us"] >= 1000 > LOOPBACK_CURVE.a * 1e6
    assert r["algorithms"]["decode"] == "direct"
    assert r["prefill_overlap"] is False  # separate devices: the prefill's allreduces are not overlapped
    assert r["shared_memory"] is False  # nor do they share memory: the emulated links carry everything
    assert _ours() == before, "the benchmark's testbed was not torn down"


def test_bench_generate_testbed_refuses_more_nodes_than_devices(tmp_path: Path) -> None:
    store = tmp_path / "store"
    entry = synth_model(ModelStore(store), ModelConfig(64, 128, 4, 2, 1, 256), seed=3)
    res = subprocess.run([sys.executable, "-m", "edgemesh.cli", "bench", "generate", entry.name, "--store", str(store),
                          "--testbed", str(REPO / "emulation" / "lan-4.toml"), "--nodes", "5"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "--nodes 5: scenario 'lan-4' has 4 device(s)" in res.stderr and "Traceback" not in res.stderr
