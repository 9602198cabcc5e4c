"""``testbed down``: remove everything a testbed created, with or without its state file.

Two sources, merged: the state file (exactly what was recorded) and a sweep of things that
carry this testbed's prefix (``/run/netns/<prefix>-*``, ``edgemesh-<prefix>`` cgroups, the
run directory). Processes are ended only by pid: recorded pids whose start time still
matches, and pids found *inside* our own namespaces or cgroups. Never by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgemesh.testbed.cgroups import CgroupLayout
from edgemesh.testbed.naming import Names
from edgemesh.testbed.state import StateFile, process_start_time
from edgemesh.testbed.steps import Kind

NETNS_DIR = Path("/run/netns")
TERM_GRACE_S = 3.0


@dataclass
class TeardownReport:
    processes: list[int] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def removed_anything(self) -> bool:
        return bool(self.processes or self.namespaces or self.cgroups or self.dirs)


def our_namespaces(names: Names) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if names.owns_netns(p.name))


def our_cgroup_dirs(names: Names, layout: CgroupLayout | None) -> list[Path]:
    """Every cgroup directory under our per-testbed groups, deepest first."""
    if layout is None:
        return []
    found: list[Path] = []
    for group in layout.group_dirs(names):
        if group.is_dir():
            found += [Path(root) for root, _, _ in os.walk(group)]
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def _netns_pids(ns: str) -> set[int]:
    result = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return {int(x) for x in result.stdout.split() if x.isdigit()}


def _cgroup_pids(path: Path) -> set[int]:
    try:
        return {int(x) for x in (path / "cgroup.procs").read_text().split()}
    except OSError:
        return set()


def end_processes(pids: dict[int, int | None], report: TeardownReport) -> None:
    """SIGTERM, a grace period, then SIGKILL; ``pids`` maps pid -> start time (None = unknown)."""

    def same(pid: int, start: int | None) -> bool:
        now = process_start_time(pid)
        return now is not None and (start is None or now == start)

    starts = {pid: (start if start is not None else process_start_time(pid)) for pid, start in pids.items()}
    live = {pid: start for pid, start in starts.items() if start is not None and same(pid, start)}
    for pid in live:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + TERM_GRACE_S
    while live and time.monotonic() < deadline:
        _reap()
        live = {p: s for p, s in live.items() if same(p, s) and not _is_zombie(p)}
        time.sleep(0.05)
    for pid in live:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    report.processes += sorted(starts)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def _reap() -> None:
    # Helpers we started ourselves (in this process) become zombies until waited for.
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def stop_daemons(state: StateFile | None, edgemesh_argv: list[str], report: TeardownReport) -> None:
    """Ask daemons to stop cleanly first (they flush state); pids are ended anyway afterwards."""
    if state is None:
        return
    for device, state_dir in state.state.daemons.items():
        ns = state.state.names().device_ns(device)
        if not (NETNS_DIR / ns).exists():
            continue
        try:
            subprocess.run(["ip", "netns", "exec", ns, *edgemesh_argv, "stop", "--state-dir", state_dir],
                           capture_output=True, timeout=10)
        except subprocess.TimeoutExpired:
            report.problems.append(f"`edgemesh stop` timed out on {device}")


def teardown(names: Names, layout: CgroupLayout | None, edgemesh_argv: list[str] | None = None) -> TeardownReport:
    report = TeardownReport()
    state = None
    try:
        state = StateFile.load(names)
    except Exception as exc:  # an unreadable state file must not stop the sweep
        report.problems.append(str(exc))
    if edgemesh_argv:
        stop_daemons(state, edgemesh_argv, report)

    namespaces = set(our_namespaces(names))
    cgroup_dirs = our_cgroup_dirs(names, layout)
    pids: dict[int, int | None] = {}
    if state is not None:
        namespaces |= {r.name for r in state.state.of_kind(Kind.NETNS) if (NETNS_DIR / r.name).exists()}
        for rec in state.state.of_kind(Kind.PROCESS):
            if rec.pid is not None and rec.is_alive():
                pids[rec.pid] = rec.start_time
    for ns in namespaces:
        for pid in _netns_pids(ns):
            pids.setdefault(pid, None)
    for d in cgroup_dirs:
        for pid in _cgroup_pids(d):
            pids.setdefault(pid, None)
    pids.pop(os.getpid(), None)
    end_processes(pids, report)

    for ns in sorted(namespaces):
        result = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
        if result.returncode == 0:
            report.namespaces.append(ns)
        elif (NETNS_DIR / ns).exists():
            report.problems.append(f"cannot delete namespace {ns}: {result.stderr.strip()}")

    recorded_cgroups = [Path(r.name) for r in state.state.of_kind(Kind.CGROUP)] if state else []
    for d in sorted(set(cgroup_dirs) | {p for p in recorded_cgroups if p.is_dir()}, key=lambda p: len(p.parts), reverse=True):
        for attempt in range(50):  # a killed process leaves its cgroup a moment after it dies
            try:
                d.rmdir()
                report.cgroups.append(str(d))
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if attempt == 49:
                    report.problems.append(f"cannot remove cgroup {d}: {exc.strerror}")
                time.sleep(0.1)

    if names.run_dir.exists():
        shutil.rmtree(names.run_dir, ignore_errors=True)
        report.dirs.append(str(names.run_dir))
    return report
