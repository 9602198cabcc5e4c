"""CLI: `edgemesh bench join` — join-to-connected per pair and path, across the testbed's NATs.

Brings the scenario up (root), starts the bootstrap with `init --turn` (coturn beside it), has
every other device `edgemesh join` one after the other, and reads each pair's ``connected_at``
from both daemons: seconds from the start of that device's `edgemesh join` command until both
ends of the pair have a working path. Then measures RTT and a checked transfer per path type.
``NatBed`` is also what the testbed tests drive.
"""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from edgemesh.cli.bench import bench_app
from edgemesh.cli.output import json_option, table_console, write_json
from edgemesh.errors import EdgemeshError

CONE_SITES = ("full-cone", "restricted", "port-restricted", "none")


class NatBed:
    """A testbed with edgemesh daemons on every device; ``close()`` tears everything down."""

    def __init__(self, scenario_path: Path, nodes_dir: Path | None = None, run_root: Path | None = None) -> None:
        from edgemesh.testbed.host import probe_host
        from edgemesh.testbed.lifecycle import up
        from edgemesh.testbed.naming import Names
        from edgemesh.testbed.scenario import load_scenario

        kwargs = {"nodes_dir": nodes_dir} if nodes_dir is not None else {}
        self.scenario = load_scenario(scenario_path, **kwargs)
        self._tmp = None if run_root else Path(tempfile.mkdtemp(prefix="em-natbed-"))
        self.names = Names("j" + secrets.token_hex(2), run_root or self._tmp)  # type: ignore[arg-type]
        self.caps = probe_host()
        self.state = up(self.scenario, self.names, self.caps)
        from edgemesh.testbed.addressing import AddressPlan

        self.plan = AddressPlan(self.scenario)
        self.token = ""
        self.started: list[str] = []

    # ---- running things in devices ---------------------------------------------
    def em(self, device: str, *args: str, timeout: float = 30.0, check: bool = True) -> str:
        from edgemesh.testbed.lifecycle import run_in_device

        res = run_in_device(self.scenario, self.names, self.caps, device, ["edgemesh", *args], capture=True,
                            timeout=timeout)
        if check and res.returncode != 0:
            raise EdgemeshError(f"`edgemesh {args[0]}` on {device} failed: {(res.stderr or res.stdout).strip()[-500:]}")
        return res.stdout

    def state_dir(self, device: str) -> str:
        from edgemesh.testbed.lifecycle import daemon_state_dir

        return str(daemon_state_dir(self.names, device))

    def common(self, device: str) -> list[str]:
        return ["--state-dir", self.state_dir(device), "--host", str(self.plan.device_address(device)),
                "--port", "7700", "--name", device, "--detach", "--no-mdns"]

    def nat_of(self, device: str) -> str:
        return self.scenario.site(self.scenario.device(device).site).nat.value

    def bootstrap(self) -> None:
        first = self.scenario.devices[0].name
        token_file = self.names.run_dir / "join-token"
        self.state.set_daemon(first, self.state_dir(first))
        self.em(first, "init", *self.common(first), "--turn", "--token-file", str(token_file))
        self.token = token_file.read_text().strip()
        self.started.append(first)

    def join(self, device: str) -> float:
        """Run `edgemesh join` in ``device``; returns the wall time it started."""
        self.state.set_daemon(device, self.state_dir(device))
        t0 = time.time()
        self.em(device, "join", self.token, *self.common(device))
        self.started.append(device)
        return t0

    def status(self, device: str) -> dict[str, Any]:
        from edgemesh.identity.statedir import StateDir

        st = json.loads(self.em(device, "status", "--state-dir", self.state_dir(device), "--json", "-"))
        st["daemon_started"] = (StateDir(Path(self.state_dir(device))).load_daemon() or {}).get("started")
        return st

    def statuses(self, devices: list[str] | None = None) -> dict[str, dict[str, Any]]:
        devices = devices or list(self.started)
        with ThreadPoolExecutor(len(devices)) as pool:
            return dict(zip(devices, pool.map(self.status, devices)))

    @staticmethod
    def links_by_name(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {m["name"]: (m.get("links") or {}) for m in status["members"] if not m.get("self")}

    def wait_connected(self, devices: list[str], timeout: float = 20.0, after: float = 0.0,
                       settle: float = 2.5, renewed: str | None = None) -> dict[str, dict[str, Any]]:
        """Statuses once every pair among ``devices`` has a path both ways; pairs with ``renewed``
        (a restarted device; every pair when None) must have been established after ``after``."""
        time.sleep(settle)  # polling with CLIs costs CPU the daemons need: look rarely
        deadline = time.monotonic() + timeout
        while True:
            st = self.statuses(devices)
            if all(self._pair_ok(st, a, b, after if renewed in (None, a, b) else 0.0)
                   for a in devices for b in devices if a != b):
                return st
            if time.monotonic() > deadline:
                raise EdgemeshError("not every pair connected: " + json.dumps(
                    {a: {b: l.get("path") for b, l in self.links_by_name(s).items()} for a, s in st.items()}))
            time.sleep(1.0)

    def wait_quiet(self, timeout: float = 20.0) -> None:
        """Until every running daemon has done its start-up work (device profile, first link
        probes): joins are timed one at a time on a settled cluster, as devices join in practice,
        not while the previous one still measures itself on the same two host cores."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.statuses()
            if all(self._settled(s) for s in st.values()):
                return
            time.sleep(0.5)

    @staticmethod
    def _settled(status: dict[str, Any]) -> bool:
        me = next((m for m in status["members"] if m.get("self")), {})
        probed = all(link.get("mbps") is not None for link in NatBed.links_by_name(status).values()
                     if link.get("path"))
        return "measured_at" in (me.get("profile") or {}) and probed

    def _pair_ok(self, st: dict[str, dict[str, Any]], a: str, b: str, after: float) -> bool:
        link = self.links_by_name(st[a]).get(b) or {}
        return bool(link.get("path")) and (link.get("since") or 0) >= after

    def restart(self, device: str) -> dict[str, Any]:
        """Stop ``device``'s daemon, start it again; seconds from the start command until every
        pair with it has a fresh path both ways (the issue's "rejoined"), overall and per pair."""
        self.em(device, "stop", "--state-dir", self.state_dir(device))
        t0 = time.time()
        self.em(device, "start", "--state-dir", self.state_dir(device), "--detach")
        devices = list(self.started)
        st = self.wait_connected(devices, timeout=30, after=t0, settle=2.0, renewed=device)
        mine = self.links_by_name(st[device])

        def back_at(link: dict[str, Any]) -> float:
            """The first path after the restart (a better one may have replaced it since)."""
            return min((t for t, path in link.get("history") or () if path and t >= t0), default=link["since"])

        pairs = []
        for o in devices:
            if o != device:
                theirs = self.links_by_name(st[o])[device]
                pairs.append({"peer": o, "path_ab": mine[o].get("path"), "path_ba": theirs.get("path"),
                              "seconds": round(max(back_at(mine[o]), back_at(theirs)) - t0, 3)})
        started = st[device].get("daemon_started")
        return {"device": device, "seconds": max(p["seconds"] for p in pairs), "pairs": pairs,
                "daemon_started_after": None if not started else round(started - t0, 3)}

    def cut_udp(self, site: str, other: str, on: bool) -> None:
        """Drop (``on``) or stop dropping all UDP between two sites' public addresses at ``site``'s
        router: a punched path between them breaks; the relay through the public coturn stays."""
        import subprocess

        table = f"{self.names.nat_table}_cut"
        far = self.plan.router_wan(other)
        rules = (f"table ip {table} {{\n chain cut {{\n  type filter hook forward priority -10; policy accept;\n"
                 f"  ip daddr {far} meta l4proto udp drop\n  ip saddr {far} meta l4proto udp drop\n }}\n}}\n"
                 if on else f"delete table ip {table}\n")
        res = subprocess.run(["ip", "netns", "exec", self.names.router_ns(site), "nft", "-f", "-"], input=rules.encode(), check=False,
                             capture_output=True, timeout=10)
        if res.returncode != 0:
            raise EdgemeshError(f"nft in {self.names.router_ns(site)}: {res.stderr.decode(errors='replace').strip()}")

    def wait_path(self, a: str, b: str, paths: tuple[str, ...], timeout: float) -> float:
        """Seconds until the a-b pair uses one of ``paths`` both ways (polled every 0.25 s)."""
        t0 = time.monotonic()
        while True:
            st = self.statuses([a, b])
            if (self.links_by_name(st[a]).get(b) or {}).get("path") in paths and \
                    (self.links_by_name(st[b]).get(a) or {}).get("path") in paths:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise EdgemeshError(f"{a}-{b} did not reach {'/'.join(paths)} within {timeout:.0f} s")
            time.sleep(0.25)

    def fallback(self, a: str, b: str) -> dict[str, Any]:
        """Break the punched path of a-b: seconds until the pair is relayed; heal it: seconds until
        it is punched again (the relayed pair's background upgrade)."""
        site_a, site_b = self.scenario.device(a).site, self.scenario.device(b).site
        self.cut_udp(site_a, site_b, True)
        try:
            relayed = self.wait_path(a, b, ("relayed",), 60)
        finally:
            self.cut_udp(site_a, site_b, False)
        punched = self.wait_path(a, b, ("punched",), 120)
        return {"pair": [a, b], "relayed_after_cut_s": round(relayed, 2), "punched_after_heal_s": round(punched, 2)}

    def link_test(self, a: str, b: str, nbytes: int, pings: int = 10) -> dict[str, Any]:
        st = self.status(a)
        node = next(m["id"] for m in st["members"] if m["name"] == b)
        # The control socket is a's address, inside a's namespace: call it from a helper there.
        code = ("import json,sys;from edgemesh.identity.statedir import StateDir;from edgemesh.runtime.control import control;"
                f"print(json.dumps(control(StateDir({self.state_dir(a)!r}),'admin.link_test',"
                f"{{'node':{node!r},'bytes':{nbytes},'pings':{pings}}},timeout=120.0)))")
        from edgemesh.testbed.lifecycle import run_in_device

        res = run_in_device(self.scenario, self.names, self.caps, a, [self.caps.python, "-c", code],
                            capture=True, timeout=150)
        if res.returncode != 0:
            raise EdgemeshError(f"link test {a}->{b} failed: {res.stderr.strip()[-500:]}")
        return json.loads(res.stdout)

    def close(self) -> None:
        from edgemesh.testbed.lifecycle import edgemesh_argv
        from edgemesh.testbed.teardown import teardown

        teardown(self.names, self.caps.cgroups, edgemesh_argv(self.caps.python))
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


def pair_rows(st: dict[str, dict[str, Any]], new: str, t0: float) -> list[dict[str, Any]]:
    """One row per pair (new, other): path both ways and seconds from the join until connected."""
    rows = []
    for other in st:
        if other == new:
            continue
        ab = NatBed.links_by_name(st[new]).get(other) or {}
        ba = NatBed.links_by_name(st[other]).get(new) or {}
        at = [x.get("connected_at") for x in (ab, ba)]
        seconds = max(at) - t0 if all(isinstance(x, (int, float)) for x in at) else None
        # The same from the new daemon's start (after its imports, before it binds its ports):
        # its own start-up cost taken out, what NAT traversal itself takes.
        started = st[new].get("daemon_started")
        traversal = max(at) - started if seconds is not None and started else None
        rank = {"lan": 0, "direct": 1, "punched": 2, "relayed": 3}
        paths = [ab.get("path"), ba.get("path")]
        worst = max(paths, key=lambda p: rank.get(p or "", 9))
        rows.append({"a": new, "b": other, "path": worst, "path_ab": paths[0], "path_ba": paths[1],
                     "seconds": None if seconds is None else round(seconds, 3),
                     "seconds_after_daemon_start": None if traversal is None else round(traversal, 3)})
    return rows


@bench_app.command("join")
def bench_join(
    scenario: Path = typer.Option(Path("emulation/nat-mix.toml"), "--scenario", help="Testbed scenario (needs root)."),
    json_path: Optional[str] = json_option("the results"),
    mib: int = typer.Option(10, "--mib", help="MiB per checked transfer, per path type."),
) -> None:
    """Join every device across the scenario's NATs; time to connected per pair and path; RTT and
    throughput per path type."""
    console = Console(stderr=True)
    bed = NatBed(scenario)
    try:
        with console.status("bootstrap (init --turn)…") as st:
            bed.bootstrap()
            pairs: list[dict[str, Any]] = []
            for dev in [d.name for d in bed.scenario.devices[1:]]:
                st.update("waiting for the cluster to settle…")
                bed.wait_quiet()
                st.update(f"{dev} joins…")
                t0 = bed.join(dev)
                statuses = bed.wait_connected(list(bed.started))
                pairs += pair_rows(statuses, dev, t0)
            st.update("RTT and transfers per path type…")
            statuses = bed.statuses()
            per_path: dict[str, dict[str, Any]] = {}
            for a, s in statuses.items():
                for b, link in NatBed.links_by_name(s).items():
                    path = link.get("path")
                    if path and path not in per_path:
                        try:
                            per_path[path] = bed.link_test(a, b, mib * 2**20)
                        except EdgemeshError as exc:  # reported, not hidden: the table shows it
                            per_path[path] = {"error": str(exc)[-300:], "rtt_ms": float("nan"),
                                              "mbytes_per_s": 0.0, "bytes": mib * 2**20, "intact": False}
                        per_path[path]["pair"] = [a, b]
            punched = next(((a, b) for a, s in statuses.items() for b, link in NatBed.links_by_name(s).items()
                            if link.get("path") == "punched" and bed.nat_of(a) != "none" and bed.nat_of(b) != "none"), None)
            fallback = None
            if punched is not None:  # the bootstrap runs coturn (init --turn): the relay is there
                st.update(f"cutting the punched path {punched[0]}-{punched[1]}…")
                fallback = bed.fallback(*punched)
            natted = [d.name for d in bed.scenario.devices[1:] if bed.nat_of(d.name) not in ("none", "symmetric")]
            restarted = natted[-1] if natted else None
            restart = None
            if restarted is not None:
                st.update(f"restarting {restarted}…")
                restart = bed.restart(restarted)
    finally:
        bed.close()

    def max_for(sym: bool) -> float | None:
        vals = [p["seconds"] for p in pairs if p["seconds"] is not None
                and ((bed.nat_of(p["a"]) == "symmetric" or bed.nat_of(p["b"]) == "symmetric") == sym)]
        return max(vals) if vals else None

    result = {
        "scenario": str(scenario), "pairs": pairs,
        "max_seconds_cone": max_for(False), "max_seconds_symmetric": max_for(True),
        "paths": {k: {"pair": v["pair"], "rtt_ms": round(v["rtt_ms"], 3), "mbytes_per_s": round(v["mbytes_per_s"], 2),
                      "bytes": v["bytes"], "intact": v["intact"], **({"error": v["error"]} if "error" in v else {})}
                  for k, v in per_path.items()},
        "restart": restart,
        "fallback": fallback,
        "targets": {"max_seconds_cone": 2.0, "max_seconds_symmetric": 3.0, "restart_seconds": 5.0},
        "measured_from": "start of each device's `edgemesh join` command (CLI start, join handshake, daemon start)",
    }
    t = Table(title="join to connected (both directions), per pair")
    for col in ("a", "b", "NATs", "path a->b", "path b->a", "seconds"):
        t.add_column(col)
    for p in pairs:
        t.add_row(p["a"], p["b"], f"{bed.nat_of(p['a'])}/{bed.nat_of(p['b'])}", str(p["path_ab"]), str(p["path_ba"]),
                  "-" if p["seconds"] is None else f"{p['seconds']:.2f}")
    table_console(json_path).print(t)
    t2 = Table(title=f"per path type: RTT and a {mib} MiB transfer (sha256 checked)")
    for col in ("path", "pair", "RTT ms", "MB/s", "intact"):
        t2.add_column(col)
    for k, v in result["paths"].items():
        t2.add_row(k, " -> ".join(v["pair"]), f"{v['rtt_ms']:.2f}", f"{v['mbytes_per_s']:.1f}", str(v["intact"]))
    table_console(json_path).print(t2)
    console.print(f"max seconds: cone/restricted {result['max_seconds_cone']} (target < 2), symmetric "
                  f"{result['max_seconds_symmetric']} (target < 3)")
    if fallback:
        console.print(f"punched path {'-'.join(fallback['pair'])} cut: relayed after {fallback['relayed_after_cut_s']} s; "
                      f"healed: punched again after {fallback['punched_after_heal_s']} s")
    if restart:
        slowest = max(restart["pairs"], key=lambda p: p["seconds"])
        console.print(f"{restarted} restarted: every pair with it back after {restart['seconds']:.2f} s (target < 5); "
                      f"daemon up after {restart['daemon_started_after']} s, slowest pair {slowest['peer']} "
                      f"({slowest['path_ab']}/{slowest['path_ba']})")
    write_json(json_path, result, note=console.print)
