"""CLI: `edgemesh cluster up|down|status` — a local cluster of daemons on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from edgemesh.cli import app
from edgemesh.errors import EdgemeshError
from edgemesh.identity.statedir import StateDir
from edgemesh.runtime import local_cluster

cluster_app = typer.Typer(help="A local cluster: N daemons on 127.0.0.1 with their own state dirs and ports.", no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")
err = Console(stderr=True)

DirOpt = typer.Option(None, "--dir", help="Where the local cluster keeps its nodes (default: $EDGEMESH_HOME/local-cluster).")


@cluster_app.command("up")
def up(
    nodes: int = typer.Option(3, "--nodes", "-n", help="How many daemons to start."),
    directory: Optional[Path] = DirOpt,
    base_port: int = typer.Option(7700, "--base-port", help="First port to try; each node takes two."),
    wait: float = typer.Option(10.0, "--wait", help="Seconds to wait for every member to be alive."),
) -> None:
    """Start N daemons on 127.0.0.1 that form one cluster."""
    d = directory or local_cluster.default_dir()
    with err.status("starting the local cluster…") as st:
        started = local_cluster.up(d, nodes, base_port, progress=lambda m: st.update(m))
        st.update("waiting for every member to be alive…")
        data = local_cluster.wait_alive(StateDir(Path(started[0].state_dir)), nodes, wait)
    alive = sum(1 for m in data.get("members", []) if m["state"] == "alive")
    err.print(f"local cluster of {nodes} node(s) in {d}: {alive} alive. "
              "`edgemesh status` shows it, `edgemesh cluster down` stops it.")
    if alive < nodes:
        raise EdgemeshError(f"only {alive} of {nodes} members became alive within {wait:g} s; see the daemon.log files in {d}")


@cluster_app.command("down")
def down(
    directory: Optional[Path] = DirOpt,
    keep: bool = typer.Option(False, "--keep", help="Keep the node state dirs (keys, logs)."),
) -> None:
    """Stop every daemon of the local cluster (by recorded pid) and remove its directory."""
    d = directory or local_cluster.default_dir()
    stopped = local_cluster.down(d, keep=keep)
    err.print(f"stopped {stopped} daemon(s)" + ("" if keep else f"; removed {d}"))


@cluster_app.command("status")
def status(directory: Optional[Path] = DirOpt) -> None:
    """Show the local cluster's processes."""
    d = directory or local_cluster.default_dir()
    nodes = local_cluster.load(d)
    if not nodes:
        err.print(f"no local cluster in {d}")
        return
    t = Table(title=f"local cluster in {d}")
    for col in ("node", "port", "pid", "running"):
        t.add_column(col)
    for n in nodes:
        t.add_row(n.name, str(n.port), str(n.pid), "yes" if n.alive() else "no")
    Console().print(t)
