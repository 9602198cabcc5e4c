"""CLI: a node's life — init, join, start, stop, leave, remove, token, status, discover."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from edgemesh.cli import app
from edgemesh.cli.output import json_option, to_stdout, write_json
from edgemesh.config import DEFAULT_PORT
from edgemesh.errors import ConfigError, NotRunningError, PortInUseError, TokenError
from edgemesh.identity.statedir import StateDir, default_state_dir
from edgemesh.identity.token import DEFAULT_TTL, JoinPoint, JoinToken, describe_expiry, parse_duration
from edgemesh.transport.endpoint import tcp_endpoint

err = Console(stderr=True)
out = Console()

StateOpt = typer.Option(None, "--state-dir", help="Node state directory (keys, cluster secret). Default: $EDGEMESH_HOME/node or the user data dir.")
HostOpt = typer.Option(None, "--host", help="Address to listen on (default 0.0.0.0; the local cluster uses 127.0.0.1).")
PortOpt = typer.Option(None, "--port", help=f"Mesh port; the join port is port + 1 (default {DEFAULT_PORT}).")
AdvOpt = typer.Option(None, "--advertise", help="Address other members should use to reach this node (default: --host, or the first LAN address).")
NameOpt = typer.Option(None, "--name", help="A human-friendly node name (default: node-<id>).")
DetachOpt = typer.Option(False, "--detach", "-d", help="Run the daemon in the background and return.")
MdnsOpt = typer.Option(True, "--mdns/--no-mdns", help="Announce the cluster on the LAN by mDNS (never the secret).")
ProfileOpt = typer.Option(None, "--profile", help="Declared device profile (nodes/*.toml) published beside the measured one.")
StunOpt = typer.Option(None, "--stun-server", help="STUN server for NAT traversal, stun:HOST[:PORT] (repeatable).")
TtlOpt = typer.Option("24h", "--ttl", help="How long the printed join token admits devices: e.g. 30m, 24h, 7d (at most 366d).")
TurnUrlOpt = typer.Option(None, "--turn-server", help="Existing TURN server, turn:[USER:PASS@]HOST[:PORT]; without USER:PASS it must use the cluster's TURN REST secret (repeatable).")


def resolve_state(state_dir: Optional[Path]) -> StateDir:
    if state_dir is not None:
        return StateDir(state_dir)
    default = StateDir(default_state_dir())
    if default.file(StateDir.IDENTITY).exists():
        return default
    # Convenience: with no node of its own, talk to the local cluster started by `cluster up`.
    from edgemesh.runtime.local_cluster import first_local_node

    local = first_local_node()
    return local if local is not None else default


def _check_port_free(host: str, port: int) -> None:
    for p in (port, port + 1):
        if not 0 < p < 65536:
            raise ConfigError(f"port {p} is out of range (1-65535)")
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, p))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUseError(f"port {p} on {host} is already in use; pick another with --port") from None
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise ConfigError(f"cannot listen on {host}: this machine has no such address (check --host)") from None
                raise ConfigError(f"cannot listen on {host}:{p}: {exc.strerror}") from None


def _settings(state: StateDir, host: Optional[str], port: Optional[int], advertise: Optional[str], mdns: bool,
              profile: Optional[Path] = None, stun: Optional[list[str]] = None, turn_servers: Optional[list[str]] = None,
              turn: Optional[bool] = None) -> dict[str, Any]:
    saved = state.load_settings()
    from edgemesh.nat.servers import parse_server

    for url in [*(stun or []), *(turn_servers or [])]:
        parse_server(url)  # a typo fails here, with the URL in the message
    if profile is not None:
        from edgemesh.config import load_toml

        load_toml(profile)  # fail now, with the file's own error, not later in the daemon
        profile = profile.absolute()
    settings = {
        "host": host or saved.get("host") or "0.0.0.0",
        "port": port or saved.get("port") or DEFAULT_PORT,
        "advertise": advertise or saved.get("advertise"),
        "mdns": mdns if not saved or mdns is False else saved.get("mdns", True),
        "profile": str(profile) if profile else saved.get("profile"),
        "stun_servers": list(stun) if stun else saved.get("stun_servers", []),
        "turn_servers": list(turn_servers) if turn_servers else saved.get("turn_servers", []),
        "turn": "local" if turn else saved.get("turn"),
    }
    # "advertise" is saved only when given: a detected address is detected again at every start
    # (a laptop's DHCP address changes), and the daemon hands it out only where routes agree.
    return settings


def _reachable(settings: dict[str, Any]) -> str:
    """The address other members reach this node at: --advertise, else --host, else detected."""
    from edgemesh.runtime.daemon import _advertise_host

    return settings["advertise"] or _advertise_host(settings["host"])


def _run(state: StateDir, settings: dict[str, Any], detach: bool) -> None:
    from edgemesh.runtime.daemon_process import ensure_not_running, start_detached

    ensure_not_running(state)
    _check_port_free(settings["host"], settings["port"])
    state.save_settings(settings)
    if detach:
        pid = start_detached(state, settings["host"], settings["port"], settings["advertise"], settings["mdns"])
        err.print(f"daemon running in the background (pid {pid}); log: {state.file(StateDir.LOG)}")
        return
    import logging

    from edgemesh.runtime.daemon_main import run_daemon

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    err.print("daemon running in the foreground; Ctrl-C to stop")
    run_daemon(state, settings["host"], settings["port"], settings["advertise"], settings["mdns"])


def _make_token(state: StateDir, points: list[JoinPoint], ttl: float = DEFAULT_TTL) -> JoinToken:
    cluster = state.require_cluster()
    return JoinToken.issue(cluster.cluster_id, cluster.secret, tuple(points), ttl)


def _emit_token(token: JoinToken, token_file: Optional[Path]) -> None:
    text = token.encode()
    if token_file is not None:
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text + "\n")
        err.print(f"join token written to {token_file} (keep it secret: it admits devices until it expires)")
    err.print(f"the token expires at {describe_expiry(token.expires)}")
    print(text)


@app.command()
def init(
    state_dir: Optional[Path] = StateOpt, host: Optional[str] = HostOpt, port: Optional[int] = PortOpt,
    advertise: Optional[str] = AdvOpt, name: Optional[str] = NameOpt, detach: bool = DetachOpt,
    mdns: bool = MdnsOpt, profile: Optional[Path] = ProfileOpt,
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="Also write the join token to this file (0600)."),
    no_start: bool = typer.Option(False, "--no-start", help="Create the cluster but do not start the daemon."),
    turn: bool = typer.Option(False, "--turn", help="Run coturn (STUN + TURN relay) beside this node for members behind NAT; credentials derive from the cluster secret."),
    stun_server: Optional[list[str]] = StunOpt, turn_server: Optional[list[str]] = TurnUrlOpt,
    ttl: str = TtlOpt,
) -> None:
    """Create a new cluster with this device as its first member, print the join token, start the daemon."""
    ttl_seconds = parse_duration(ttl)
    state = StateDir(state_dir or default_state_dir())
    state.ensure()
    existing = state.load_cluster()
    if existing is not None:
        raise ConfigError(
            f"{state.path} is already a member of cluster {existing.cluster_id}; run `edgemesh start` "
            "to start it, or pass another --state-dir")
    if turn and shutil.which("turnserver") is None:
        raise ConfigError("--turn needs coturn (`apt-get install coturn`), or point at an existing server with --turn-server")
    settings = _settings(state, host, port, advertise, mdns, profile, stun_server, turn_server, turn)
    if turn and _reachable(settings) in ("0.0.0.0", "127.0.0.1", "::"):
        raise ConfigError("--turn needs an address other members can reach: pass --advertise or --host")
    if not no_start:
        from edgemesh.runtime.daemon_process import ensure_not_running

        ensure_not_running(state)
        _check_port_free(settings["host"], settings["port"])
    key, node_name = state.load_or_create_identity(name)
    cluster = state.new_cluster(root=key.node_id)
    state.save_settings(settings)
    token = _make_token(state, [JoinPoint(tcp_endpoint(_reachable(settings), settings["port"] + 1), key.sign_public)],
                        ttl_seconds)
    err.print(f"created cluster [bold]{cluster.cluster_id}[/] with {node_name} ({key.node_id}); "
              "add devices with: edgemesh join TOKEN")
    _emit_token(token, token_file)
    if not no_start:
        _run(state, settings, detach)


@app.command()
def join(
    token: Optional[str] = typer.Argument(None, help="The join token printed by `edgemesh init` or `edgemesh token` (or $EDGEMESH_TOKEN)."),
    state_dir: Optional[Path] = StateOpt, host: Optional[str] = HostOpt, port: Optional[int] = PortOpt,
    advertise: Optional[str] = AdvOpt, name: Optional[str] = NameOpt, detach: bool = DetachOpt,
    mdns: bool = MdnsOpt, profile: Optional[Path] = ProfileOpt,
    no_start: bool = typer.Option(False, "--no-start", help="Join but do not start the daemon."),
    stun_server: Optional[list[str]] = StunOpt, turn_server: Optional[list[str]] = TurnUrlOpt,
) -> None:
    """Join an existing cluster with a token, then run the daemon."""
    token = token or os.environ.get("EDGEMESH_TOKEN")
    if not token:
        raise TokenError("missing join token: `edgemesh join TOKEN` (get one with `edgemesh token` on a member)")
    parsed = JoinToken.decode(token)
    state = StateDir(state_dir or default_state_dir())
    state.ensure()
    existing = state.load_cluster()
    settings = _settings(state, host, port, advertise, mdns, profile, stun_server, turn_server)
    if existing is not None:
        if existing.cluster_id != parsed.cluster_id:
            raise ConfigError(
                f"{state.path} is already a member of cluster {existing.cluster_id}; "
                "`edgemesh leave` first, or pass another --state-dir")
        err.print(f"already a member of cluster {existing.cluster_id}; starting the daemon")
        if not no_start:
            _run(state, settings, detach)
        return
    from edgemesh.runtime.daemon_process import ensure_not_running

    ensure_not_running(state)
    _check_port_free(settings["host"], settings["port"])
    key, node_name = state.load_or_create_identity(name)
    from edgemesh.mesh.join_client import join_cluster

    addresses = (tcp_endpoint(_reachable(settings), settings["port"]),)
    joins = (tcp_endpoint(_reachable(settings), settings["port"] + 1),)
    result = asyncio.run(join_cluster(key, node_name, parsed, addresses, joins, discover=settings["mdns"]))
    state.save_cluster(result.cluster)
    state.save_members(result.records, result.removals)
    state.save_settings(settings)
    err.print(f"{node_name} ({key.node_id}) joined cluster [bold]{result.cluster.cluster_id}[/] via {result.via}")
    if not no_start:
        _run(state, settings, detach)


@app.command()
def start(
    state_dir: Optional[Path] = StateOpt, host: Optional[str] = HostOpt, port: Optional[int] = PortOpt,
    advertise: Optional[str] = AdvOpt, detach: bool = DetachOpt, mdns: bool = MdnsOpt,
    profile: Optional[Path] = ProfileOpt,
) -> None:
    """Start the daemon of a node that already belongs to a cluster (e.g. after a reboot)."""
    state = StateDir(state_dir or default_state_dir())
    state.load_identity()
    state.require_cluster()
    _run(state, _settings(state, host, port, advertise, mdns, profile), detach)


@app.command()
def stop(state_dir: Optional[Path] = StateOpt) -> None:
    """Stop this node's daemon (it stays a member and rejoins on `edgemesh start`)."""
    from edgemesh.runtime.daemon_process import stop_daemon

    state = resolve_state(state_dir)
    if not stop_daemon(state):
        raise NotRunningError(f"no daemon is running for {state.path}")
    err.print("daemon stopped")


@app.command()
def leave(state_dir: Optional[Path] = StateOpt) -> None:
    """Leave the cluster for good: tell the others, stop the daemon, forget the cluster secret."""
    from edgemesh.runtime.control import control
    from edgemesh.runtime.processes import running_daemon
    from edgemesh.runtime.processes import wait_gone

    state = StateDir(state_dir or default_state_dir())
    state.load_identity()
    cluster = state.require_cluster()
    rec = running_daemon(state)
    if rec is None:
        raise NotRunningError(
            f"the daemon for {state.path} is not running; start it (`edgemesh start -d`) so it can tell the others")
    result = control(state, "admin.leave", timeout=8.0)
    wait_gone(int(rec["pid"]), float(rec["create_time"]), 10.0)
    state.forget_cluster()
    told = result.get("told", 0) if isinstance(result, dict) else 0
    err.print(f"left cluster {cluster.cluster_id} ({told} member(s) acknowledged); this device has a new key "
              "for any later join (the cluster refuses the old one)")


@app.command()
def remove(
    node: str = typer.Argument(..., help="The member to remove: its name, id or an id prefix (see `edgemesh status`)."),
    state_dir: Optional[Path] = StateOpt,
) -> None:
    """Remove another member for good (e.g. a lost device): every member refuses its key, closes its
    links and voids what it admits from now on. Follow with `edgemesh token --rotate`."""
    from edgemesh.runtime.control import control

    state = resolve_state(state_dir)
    result = control(state, "admin.remove", {"node": node}, timeout=15.0)
    err.print(f"removed {result['name']} ({result['removed']}) in epoch {result['epoch']}; "
              f"{result['told']} of {result['members']} other member(s) acknowledged, the rest hear it by gossip. "
              "It may still know the cluster secret: run `edgemesh token --rotate`.")


@app.command()
def token(
    state_dir: Optional[Path] = StateOpt,
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="Also write the token to this file (0600)."),
    ttl: str = TtlOpt,
    rotate: bool = typer.Option(False, "--rotate", help="First replace the cluster secret on every member: every token made before stops working (members keep working)."),
) -> None:
    """Print a join token listing the alive members (so a join works even if one of them is down)."""
    from edgemesh.identity.keys import NodeKey  # noqa: F401  (keeps the import graph obvious)
    from edgemesh.runtime.control import control

    ttl_seconds = parse_duration(ttl)
    state = resolve_state(state_dir)
    if rotate:
        result = control(state, "admin.rotate", timeout=15.0)
        err.print(f"cluster secret rotated (epoch {result['epoch']}); {result['told']} of {result['members']} other "
                  "member(s) acknowledged, the rest hear it by gossip. Tokens made before now no longer admit anyone.")
    status = control(state, "status")
    me = status["node"]
    members = sorted(status["members"], key=lambda m: (m["id"] != me, m["name"]))
    points = [JoinPoint(m["join"][0], bytes.fromhex(m["key"])) for m in members
              if m["state"] == "alive" and m.get("join")][:8]
    _emit_token(_make_token(state, points, ttl_seconds), token_file)


def _fmt_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "-"
    return f"{n / 2**30:.1f}G"


@app.command()
def status(
    state_dir: Optional[Path] = StateOpt,
    json_path: Optional[str] = json_option("the cluster ({members: [{id, name, state, addresses, profile, links}]})"),
    links: bool = typer.Option(False, "--links", help="Show the link table (path, RTT, bandwidth) per peer."),
) -> None:
    """Show the cluster as this node sees it."""
    from edgemesh.runtime.control import control

    state = resolve_state(state_dir)
    data = control(state, "status")
    write_json(json_path, data, default=str, note=Console(stderr=True).print)
    if to_stdout(json_path):
        return
    t = Table(title=f"cluster {data['cluster']} (seen from {data['name']}, marked *)")
    for col in ("name", "id", "state", "address", "cpus", "memory", "GFLOP/s", "RTT ms", "Mbit/s"):
        t.add_column(col, no_wrap=col in ("name", "address", "state"))
    colors = {"alive": "green", "suspect": "yellow", "dead": "red"}
    for m in data["members"]:
        p, link = m.get("profile") or {}, m.get("links") or {}
        lim = p.get("limits") or {}
        cpus = lim.get("cpu_cores") or p.get("cpu_logical")
        mem = lim.get("mem_bytes") or p.get("mem_total")
        t.add_row(
            m["name"] + (" *" if m.get("self") else ""), m["id"][:8],
            f"[{colors.get(m['state'], 'white')}]{m['state']}[/]",
            ", ".join(a.removeprefix("tcp://") for a in m["addresses"]), "-" if cpus is None else f"{cpus:g}", _fmt_bytes(mem),
            "-" if p.get("gflops") is None else f"{p['gflops']:.0f}",
            "-" if link.get("rtt_ms") is None else f"{link['rtt_ms']:.2f}",
            "-" if link.get("mbps") is None else f"{link['mbps']:.0f}",
        )
    out.print(t)
    removed = data.get("removed")
    if removed:
        how = "left the cluster" if removed.get("left") else f"was removed from the cluster by {removed.get('by_name') or removed['by']}"
        err.print(f"[red]this node {how} (epoch {removed['epoch']}): no member serves it or accepts what it admits[/]")
    if links:
        lt = Table(title="links from this node (path: lan | direct | punched | relayed)")
        for col in ("peer", "path", "RTT ms", "Mbit/s", "since", "changes", "before (newest first)"):
            lt.add_column(col)
        for m in data["members"]:
            link = m.get("links") or {}
            if link:
                rtt, mbps = link.get("rtt_ms"), link.get("mbps")
                earlier = [p or "none" for _, p in (link.get("history") or [])[-4:-1]][::-1]
                lt.add_row(m["name"], link.get("path") or "[red]none[/]", "-" if rtt is None else f"{rtt:.2f}",
                           "-" if mbps is None else f"{mbps:.1f}",
                           time.strftime("%H:%M:%S", time.localtime(link.get("since", 0))), str(link.get("changes", 0)),
                           ", ".join(earlier) or "-")
        out.print(lt)
        nat = data.get("nat") or {}
        if nat:
            err.print(f"NAT traversal: servers {', '.join(nat.get('servers') or []) or 'none'}; "
                      f"{nat.get('sessions', 0)} ICE sessions, {nat.get('refused_channels', 0)} refused channels"
                      + (f"; coturn pid {nat['turn_pid']}" if nat.get("turn_pid") else ""))


@app.command()
def discover(seconds: float = typer.Option(2.0, "--seconds", help="How long to listen.")) -> None:
    """List edgemesh clusters announced on the LAN (mDNS)."""
    from edgemesh.mesh.discovery import browse

    found = asyncio.run(browse(seconds))
    if not found:
        err.print("no edgemesh cluster announced on this LAN")
        return
    t = Table(title="clusters on the LAN")
    for col in ("cluster", "node", "name", "join endpoint"):
        t.add_column(col)
    for a in found:
        t.add_row(a.cluster_id, a.node_id[:12], a.name, a.join_endpoint)
    out.print(t)
