"""Device profile: what this device has (psutil, cgroup limits) and what it measures (matmul,
disk read). Run as a child process (`python -m edgemesh.mesh.profile`) so the torch import and
the measurement never stall the daemon's event loop, and its memory is returned afterwards.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil


def cgroup_limits() -> dict[str, Any]:
    """Memory limit (bytes) and CPU quota (cores) this process runs under, v1 or v2; None if unlimited."""
    mem: int | None = None
    cpu: float | None = None
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return {"mem_bytes": None, "cpu_cores": None}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        ctrl = set(controllers.split(","))
        if controllers == "":  # cgroup v2 unified
            base = Path("/sys/fs/cgroup") / path.lstrip("/")
            mem = mem or _read_limit(base / "memory.max")
            try:
                quota, period = (base / "cpu.max").read_text().split()
                if quota != "max":
                    cpu = int(quota) / int(period)
            except (OSError, ValueError):
                pass
        if "memory" in ctrl:
            mem = _read_limit(Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes") or mem
        if "cpu" in ctrl:
            for root in ("/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"):
                base = Path(root) / path.lstrip("/")
                try:
                    quota = int((base / "cpu.cfs_quota_us").read_text())
                    period = int((base / "cpu.cfs_period_us").read_text())
                    if quota > 0:
                        cpu = quota / period
                    break
                except (OSError, ValueError):
                    continue
    return {"mem_bytes": mem, "cpu_cores": cpu}


def _read_limit(p: Path) -> int | None:
    try:
        text = p.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    # v1 reports "unlimited" as a huge number near 2^63.
    return value if value < (1 << 60) else None


def static_profile() -> dict[str, Any]:
    vm = psutil.virtual_memory()
    freq = psutil.cpu_freq()
    try:
        disk_free = psutil.disk_usage(os.getcwd()).free
    except OSError:
        disk_free = None
    return {
        "machine": platform.machine(),
        "system": platform.system(),
        "cpu_logical": psutil.cpu_count(logical=True),
        "cpu_physical": psutil.cpu_count(logical=False),
        "cpu_mhz": round(freq.current) if freq else None,
        "mem_total": vm.total,
        "mem_available": vm.available,
        "disk_free": disk_free,
        "limits": cgroup_limits(),
    }


def torch_threads(cpu_cores: float | None, logical: int, shared: int = 1) -> int:
    """Torch threads for one of ``shared`` processes on a machine with ``logical`` cores under a
    CPU quota of ``cpu_cores`` (None = none): its share of the usable cores, at least 1. Torch
    sizes its pool by logical cores, and threads beyond the quota only spin and get throttled
    (2 threads under a 0.5-core quota measured a lan-4 testbed device ~4x slower than 1)."""
    usable = min(float(cpu_cores), logical) if cpu_cores else logical
    return max(1, int(usable // max(1, shared)))


def measure_gflops(seconds: float = 0.5, n: int = 512, windows: int = 5) -> float:
    """Sustained fp32 matmul GFLOP/s with the torch threads a rank here would run (``torch_threads``
    of this process's quota): the best of ``windows`` equal windows, since whatever else runs on
    the machine only ever slows a window down. Measured with torch's default pool (every logical
    core) and one 0.3 s window, four identical 0.5-core testbed devices published 7-20 GFLOP/s
    (the planner then gave one of three identical devices 53 % of the model); like this,
    40-45 GFLOP/s, four at once."""
    import torch

    torch.set_num_threads(torch_threads(cgroup_limits()["cpu_cores"], psutil.cpu_count(logical=True) or 1))
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    flop = 2 * n**3
    best = 0.0
    for _ in range(windows):
        reps, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / windows:
            torch.mm(a, b)
            reps += 1
        best = max(best, flop * reps / elapsed / 1e9)
    return round(best, 2)


def measure_disk_read_mbps(directory: str | None = None, size: int = 32 << 20) -> float | None:
    """Sequential read of a fresh file after dropping it from the page cache (Linux fadvise)."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory, delete=True) as fh:
            block = os.urandom(1 << 20)
            for _ in range(size >> 20):
                fh.write(block)
            fh.flush()
            os.fsync(fh.fileno())
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            start = time.perf_counter()
            with open(fh.name, "rb", buffering=0) as rd:
                while rd.read(1 << 20):
                    pass
            elapsed = time.perf_counter() - start
        return round(size / elapsed / 1e6, 1)
    except OSError:
        return None


def measure_profile(directory: str | None = None, *, disk: bool = True) -> dict[str, Any]:
    profile = static_profile()
    profile["gflops"] = measure_gflops()
    if disk:
        profile["disk_read_mbps"] = measure_disk_read_mbps(directory)
    profile["measured_at"] = time.time()
    return profile


def main(argv: list[str]) -> None:
    """``python -m edgemesh.mesh.profile [DIR] [--no-disk] [--repeat N] [--pause S]``: N profiles,
    S seconds apart, one JSON object per line as each is made (the disk read speed, in DIR,
    only in the first, and not with --no-disk)."""
    import argparse

    parser = argparse.ArgumentParser(prog="edgemesh.mesh.profile")
    parser.add_argument("directory", nargs="?")
    parser.add_argument("--no-disk", action="store_true")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--pause", type=float, default=0.0)
    args = parser.parse_args(argv)
    for i in range(max(1, args.repeat)):
        if i:
            time.sleep(max(0.0, args.pause))
        print(json.dumps(measure_profile(args.directory, disk=i == 0 and not args.no_disk)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
