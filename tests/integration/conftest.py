from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import psutil
import pytest

from edgemesh.identity.statedir import StateDir
from edgemesh.runtime import local_cluster
from edgemesh.runtime.control import control


def run_cli(*args: str, home: Path, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGEMESH_HOME": str(home), "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "edgemesh.cli.__main__", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"edgemesh {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    return last


def states(state: StateDir) -> dict[str, str]:
    return {m["name"]: m["state"] for m in control(state, "status")["members"]}


def cluster_base_port() -> int:
    """A random first port for a test's local cluster, below Linux's ephemeral range (32768+):
    `free_port_pair` checks a port is free, but an outgoing connection elsewhere can take an
    ephemeral port before the daemon binds it (a CI setup failed on 39756 so)."""
    return random.randrange(20000, 32000, 2)


@pytest.fixture
def cluster3(tmp_path):
    """A fresh 3-node local cluster; torn down (and checked for leftovers) afterwards."""
    d = tmp_path / "lc"
    nodes = local_cluster.up(d, 3, base_port=cluster_base_port())
    yield d, [StateDir(Path(n.state_dir)) for n in nodes], nodes
    local_cluster.down(d)
    for n in local_cluster.load(d) or nodes:
        assert not n.alive()


def no_daemon_processes_under(path: Path) -> bool:
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if "edgemesh.runtime.daemon_main" in cmd and str(path) in cmd:
            return False
    return True


@pytest.fixture
def fd_room():
    """Room for 10,000 sockets in this process (flood tests): raise the descriptor limit (root
    may raise the hard limit too), restore it afterwards, skip if it cannot be had."""
    import resource

    need = 11_000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), max(hard, need)))
    except (ValueError, OSError):
        if hard < need:
            pytest.skip(f"this process may open only {hard} descriptors; the flood needs {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    yield
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
