"""A cluster of N daemons on 127.0.0.1 — the default for the demo, tests and trying it out.

Everything it starts is recorded in ``<dir>/cluster.json`` (pid + process start time per
node) as soon as it exists, so `cluster down` can stop exactly those processes, by pid, and
remove the directory — also after the `cluster up` that made them crashed.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import psutil

from edgemesh.config import edgemesh_home
from edgemesh.errors import EdgemeshError
from edgemesh.identity.statedir import StateDir
from edgemesh.identity.token import JoinPoint, JoinToken
from edgemesh.runtime.processes import same_process
from edgemesh.transport.endpoint import tcp_endpoint

HOST = "127.0.0.1"
RECORD = "cluster.json"


def default_dir() -> Path:
    return edgemesh_home() / "local-cluster"


@dataclass
class LocalNode:
    name: str
    state_dir: str
    port: int
    pid: int | None = None
    create_time: float | None = None

    def alive(self) -> bool:
        return same_process(self.pid, self.create_time)


def load(directory: Path) -> list[LocalNode]:
    try:
        data = json.loads((directory / RECORD).read_text())
        return [LocalNode(**n) for n in data["nodes"]]
    except FileNotFoundError:
        return []
    except (ValueError, KeyError, TypeError):
        raise EdgemeshError(f"{directory / RECORD} is damaged; remove {directory} by hand if no daemon is running") from None


def _save(directory: Path, nodes: list[LocalNode]) -> None:
    tmp = directory / (RECORD + ".tmp")
    tmp.write_text(json.dumps({"nodes": [n.__dict__ for n in nodes], "host": HOST}, indent=1))
    tmp.replace(directory / RECORD)


def first_local_node(directory: Path | None = None) -> StateDir | None:
    try:
        nodes = load(directory or default_dir())
    except EdgemeshError:
        return None
    for n in nodes:
        if n.alive():
            return StateDir(Path(n.state_dir))
    return None


def free_port_pair(start: int, taken: set[int]) -> int:
    """The first port p ≥ start such that p and p+1 are free on 127.0.0.1."""
    p = start
    while p < 65000:
        if p not in taken and p + 1 not in taken and _free(p) and _free(p + 1):
            return p
        p += 2
    raise EdgemeshError("no two free consecutive ports found on 127.0.0.1")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def up(directory: Path, count: int, base_port: int = 7700, progress: Callable[[str], None] = lambda m: None) -> list[LocalNode]:
    from edgemesh.mesh.join_client import join_cluster
    from edgemesh.runtime.daemon_process import wait_ready

    if count < 1 or count > 64:
        raise EdgemeshError(f"--nodes must be between 1 and 64 (got {count})")
    running = [n for n in load(directory) if n.alive()]
    if running:
        raise EdgemeshError(f"a local cluster is already running in {directory} ({len(running)} node(s)); "
                            "stop it with `edgemesh cluster down`")
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True, mode=0o700)
    nodes: list[LocalNode] = []
    taken: set[int] = set()
    for i in range(count):
        port = free_port_pair(base_port, taken)
        taken.update((port, port + 1))
        nodes.append(LocalNode(f"node{i}", str(directory / f"node{i}"), port))
    _save(directory, nodes)
    try:
        # The first node founds the cluster; its daemon must run before others can join.
        root = StateDir(Path(nodes[0].state_dir))
        key, _ = root.load_or_create_identity(nodes[0].name)
        cluster = root.new_cluster(key.node_id)
        progress(f"starting {nodes[0].name} (founder) on port {nodes[0].port}")
        wait_ready(root, _spawn_recorded(root, nodes[0], nodes, directory))
        token = JoinToken.issue(cluster.cluster_id, cluster.secret,
                                (JoinPoint(tcp_endpoint(HOST, nodes[0].port + 1), key.sign_public),), ttl=3600)
        procs = []
        for n in nodes[1:]:
            progress(f"joining {n.name} on port {n.port}")
            state = StateDir(Path(n.state_dir))
            k, name = state.load_or_create_identity(n.name)
            # The founder may still be starting up (its profile, aiortc's import) on a busy
            # machine: a challenge unanswered for 3 s failed a test setup once; this is loopback.
            result = asyncio.run(join_cluster(
                k, name, token, (tcp_endpoint(HOST, n.port),), (tcp_endpoint(HOST, n.port + 1),), timeout=15.0,
                discover=False))
            state.save_cluster(result.cluster)
            state.save_members(result.records, result.removals)
            procs.append((state, _spawn_recorded(state, n, nodes, directory)))
        for state, proc in procs:
            wait_ready(state, proc)
    except BaseException:
        down(directory)
        raise
    return nodes


def _spawn_recorded(state: StateDir, node: LocalNode, nodes: list[LocalNode], directory: Path) -> Any:
    """Start ``node``'s daemon and record its pid and start time right away (for `down`)."""
    from edgemesh.runtime.daemon_process import spawn

    state.save_settings({"host": HOST, "port": node.port, "advertise": HOST, "mdns": False})
    proc = spawn(state, HOST, node.port, HOST, False)
    node.pid = proc.pid
    node.create_time = psutil.Process(proc.pid).create_time()
    _save(directory, nodes)
    return proc


def wait_alive(state: StateDir, count: int, timeout: float) -> dict[str, Any]:
    """Poll the node's status until ``count`` members are alive (or the timeout passes)."""
    from edgemesh.runtime.control import control

    deadline = time.monotonic() + timeout
    data: dict[str, Any] = {}
    while time.monotonic() < deadline:
        data = control(state, "status")
        if sum(1 for m in data["members"] if m["state"] == "alive") >= count:
            return data
        time.sleep(0.1)
    return data


def down(directory: Path, keep: bool = False) -> int:
    """Stop every recorded daemon (by pid), then remove the directory. Returns how many ran."""
    from edgemesh.runtime.daemon_process import stop_daemon

    stopped = 0
    for n in load(directory):
        if not n.alive():
            continue
        stopped += 1
        state = StateDir(Path(n.state_dir))
        try:
            stop_daemon(state, timeout=5.0)
        except EdgemeshError:
            pass
        if n.alive():  # not answering and no daemon record: end it by its recorded pid
            try:
                psutil.Process(n.pid).kill()  # type: ignore[arg-type]
                psutil.Process(n.pid).wait(3)  # type: ignore[arg-type]
            except psutil.Error:
                pass
    if not keep and directory.exists():
        shutil.rmtree(directory, ignore_errors=True)
    return stopped
