"""Issue 14 acceptance: a device capped at 384 MiB with a Pi-class disk runs its slice of a model
whose slice is >= 4x that cap, in a 2-device tensor-parallel group on lan-4, streaming its
weights through the planner's window; it generates tokens and is not killed."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from edgemesh.bench.window import BenchOptions, _run
from edgemesh.llm.build import rank_files
from edgemesh.placement.budget import plan_with_budget
from edgemesh.placement.devices import Device
from edgemesh.testbed.addressing import AddressPlan
from edgemesh.testbed.lifecycle import device_argv, device_env
from edgemesh.testbed.scenario import load_scenario
from edgemesh.weights.config import ModelConfig
from edgemesh.weights.store import ModelStore
from edgemesh.weights.synth import synth_model

from .conftest import NODES, REPO, Bed, fresh_names

pytestmark = [pytest.mark.testbed, pytest.mark.slow, pytest.mark.timeout(900)]  # ~4-5 min: 3 forwards at 45 MB/s

CAP_MIB = 384
DISK_MBYTE_S = 45.0  # nodes/pi4.toml: microSD
GROUP = ("dev1", "dev2")


def test_slice_four_times_the_memory_cap_streams_and_generates(caps, run_root: Path) -> None:  # type: ignore[no-untyped-def]
    if caps.cgroups is None or caps.cgroups.io_root is None:
        pytest.skip("needs the cgroup blkio (v1) or io (v2) controller for the disk cap")
    lan4 = load_scenario(REPO / "emulation" / "lan-4.toml", nodes_dir=NODES)
    scenario = replace(lan4, devices=tuple(replace(d, memory_mib=CAP_MIB, disk_read_mbyte_s=DISK_MBYTE_S)
                                           if d.name in GROUP else d for d in lan4.devices))
    # Half a layer is ~22.5 MB per member: 74 layers give each member a slice of >= 1.6 GB.
    config = ModelConfig(1024, 2816, 8, 2, 74, 4096, max_position_embeddings=512)
    entry = synth_model(ModelStore(run_root / "store"), config, seed=1)
    cap = CAP_MIB << 20
    devices = [Device(name, 12.5, cap, 2.5, DISK_MBYTE_S) for name in GROUP]
    plan = plan_with_budget(config, devices, budget_bytes=cap, context_len=64, prompt_tokens=8)
    assert plan.window >= 2 and plan.world_size == 2
    assert all(d.mem_bytes <= cap for d in plan.devices)
    specs = [plan.specs_for(r) for r in range(2)]
    paths = [{b: entry.root / ref.name for b, ref in rank_files(entry, specs[r], r, 2).items()} for r in range(2)]
    for r in range(2):
        assert sum(p.stat().st_size for p in set(paths[r].values())) >= 4 * cap

    bed = Bed(scenario, fresh_names(run_root), caps)
    try:
        addresses = AddressPlan(scenario)

        def launch(rank: int, argv: list[str]) -> tuple[list[str], dict[str, str]]:
            return device_argv(bed.names, caps, GROUP[rank], argv), device_env(scenario, bed.names, GROUP[rank])

        res = _run(BenchOptions(tokens=1, prompt_tokens=8), config, specs, paths, plan.window, True, 4,
                   launch=launch, hosts=[str(addresses.device_address(d)) for d in GROUP])
        assert "error" not in res, res.get("error")
        master, worker = res["members"]
        assert len(master["tokens"]) == 1 and master["ms_per_token"] > 0
        seen = []
        for name, member in zip(GROUP, (master, worker)):
            mem_dir = caps.cgroups.device_dirs(bed.names, name)[0]
            if caps.cgroups.version == 1:
                usage = int((mem_dir / "memory.max_usage_in_bytes").read_text())
                kills = (mem_dir / "memory.oom_control").read_text()
                assert "oom_kill 0" in kills, kills
            else:
                usage = int((mem_dir / "memory.peak").read_text()) if (mem_dir / "memory.peak").exists() else 0
            assert usage <= cap
            stats = member["stats"]
            assert stats["max_resident_blocks"] <= plan.window
            # the disk cap held: uncached reads no faster than the Pi's card (+ tolerance)
            assert 0 < stats["read_mbyte_s"] <= DISK_MBYTE_S * 1.2, stats
            seen.append(f"{name}: slice {member['weight_bytes'] / 1e6:.0f} MB, peak RSS "
                        f"{member['peak_rss_bytes'] / 1e6:.0f} MB (predicted {member['predicted']['total'] / 1e6:.0f}), "
                        f"cgroup peak {usage / 1e6:.0f} MB of {cap / 1e6:.0f}, read {stats['read_mbyte_s']} MB/s")
        print(f"\nwindow w={plan.window}: {master['ms_per_token'] / 1e3:.1f} s/token, prefill "
              f"{master['prefill_ms'] / 1e3:.1f} s; " + "; ".join(seen))
    finally:
        bed.close()
