"""Guaranteed teardown: SIGKILL the runner (mid-build, and a `run` holding a process), then
`down` leaves nothing with the prefix; a second testbed with another prefix is untouched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgemesh.testbed.cgroups import CgroupLayout
from edgemesh.testbed.naming import Names
from edgemesh.testbed.teardown import our_namespaces

from .conftest import NODES, REPO, fresh_names

pytestmark = pytest.mark.testbed

SCENARIO = REPO / "emulation" / "nat-mix.toml"


def cli(names: Names, *args: str, command: tuple[str, ...] = ()) -> list[str]:
    argv = [sys.executable, "-c", "from edgemesh.cli import main; main()", "testbed", *args,
            "--prefix", names.prefix, "--run-root", str(names.run_root), "--nodes", str(NODES)]
    return argv + (["--", *command] if command else [])


def running(pid: int) -> bool:
    """Exists and is not a zombie (killed orphans wait a moment for init to reap them)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def leftovers(names: Names, pids: list[int]) -> dict[str, object]:
    layout = CgroupLayout.detect()
    assert layout is not None
    procs = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # wires, probes and turnserver all name our namespaces or run dir on their command line
        if (f"{names.prefix}-" in cmdline or str(names.run_dir) in cmdline) and running(int(entry.name)):
            procs.append((int(entry.name), cmdline[:80]))
    alive = [pid for pid in pids if running(pid)]
    return {
        "namespaces": our_namespaces(names),
        "cgroups": [str(g) for g in layout.group_dirs(names) if g.exists()],
        "processes": procs,
        "recorded_pids_alive": alive,
        "run_dir": names.run_dir.exists(),
    }


def recorded_pids(names: Names) -> list[int]:
    try:
        state = json.loads(names.state_file.read_text())
    except (OSError, ValueError):
        return []
    return [r["pid"] for r in state["records"] if r.get("pid")]


def assert_clean(names: Names, pids: list[int]) -> None:
    left = leftovers(names, pids)
    assert left == {"namespaces": [], "cgroups": [], "processes": [], "recorded_pids_alive": [], "run_dir": False}, left


def test_sigkill_mid_build_then_down_leaves_nothing(run_root: Path) -> None:
    names = fresh_names(run_root)
    other = fresh_names(run_root)
    subprocess.run(cli(other, "up", str(SCENARIO)), check=True, capture_output=True, timeout=120)
    try:
        runner = subprocess.Popen(cli(names, "up", str(SCENARIO)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Kill as soon as the build is well under way: several namespaces, maybe some helpers.
        deadline = time.monotonic() + 60
        while len(our_namespaces(names)) < 6 and time.monotonic() < deadline and runner.poll() is None:
            time.sleep(0.005)
        runner.send_signal(signal.SIGKILL)
        runner.wait()
        assert our_namespaces(names), "the runner was killed before it created anything"
        pids = recorded_pids(names)
        subprocess.run(cli(names, "down", str(SCENARIO)), check=True, capture_output=True, timeout=120)
        assert_clean(names, pids)
        # The other testbed is untouched.
        assert len(our_namespaces(other)) == 12
        assert all(running(pid) for pid in recorded_pids(other))
    finally:
        subprocess.run(cli(other, "down", str(SCENARIO)), capture_output=True, timeout=120)
        subprocess.run(cli(names, "down", str(SCENARIO)), capture_output=True, timeout=120)
    assert_clean(other, [])


def test_sigkill_of_a_run_then_down_ends_its_processes(run_root: Path) -> None:
    names = fresh_names(run_root)
    try:
        subprocess.run(cli(names, "up", str(SCENARIO)), check=True, capture_output=True, timeout=120)
        pids = recorded_pids(names)
        assert pids, "no helper processes recorded"
        runner = subprocess.Popen(cli(names, "run", str(SCENARIO), "--no-daemons", "--on", "c1", command=("sleep", "600")),
                                  start_new_session=True)
        layout = CgroupLayout.detect()
        assert layout is not None
        procs_file = layout.device_dirs(names, "c1")[0] / "cgroup.procs"
        deadline = time.monotonic() + 30
        while not procs_file.read_text().split() and time.monotonic() < deadline:
            time.sleep(0.05)
        sleeper = [int(p) for p in procs_file.read_text().split()]
        assert sleeper, "the command never entered the device cgroup"
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait()
        assert all(running(p) for p in sleeper)  # orphaned, still capped
        subprocess.run(cli(names, "down", str(SCENARIO)), check=True, capture_output=True, timeout=120)
        assert_clean(names, pids + sleeper)
    finally:
        subprocess.run(cli(names, "down", str(SCENARIO)), capture_output=True, timeout=120)
