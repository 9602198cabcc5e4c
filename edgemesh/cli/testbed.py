"""CLI: the emulated testbed — up, status, run, check, down. Parsing and printing only."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgemesh.cli import app
from edgemesh.cli.output import json_option, to_stdout, write_json
from edgemesh.config import TestbedSettings
from edgemesh.errors import ConfigError

testbed_app = typer.Typer(
    help="Emulated edge cluster on this machine: namespaces, NATs, shaped links, CPU/memory caps (root).",
    no_args_is_help=True,
)
app.add_typer(testbed_app, name="testbed")

out = Console()
err = Console(stderr=True)

ScenarioArg = typer.Argument(..., help="Scenario file (emulation/*.toml) or its name, e.g. lan-4.")
PrefixOpt = typer.Option(None, "--prefix", help="Name prefix of this testbed (2-6 chars); default derived from the scenario name. Two testbeds need two prefixes.")
RunRootOpt = typer.Option(None, "--run-root", hidden=True, help="Where state files live (default /run/edgemesh-testbed).")
NodesOpt = typer.Option(None, "--nodes", help="Device profile directory (default: nodes/ next to emulation/).")
JsonOpt = json_option("the report")


def _load(scenario: str, prefix: Optional[str], run_root: Optional[Path], nodes: Optional[Path]):  # type: ignore[no-untyped-def]
    from edgemesh.testbed.naming import DEFAULT_RUN_ROOT, Names, derive_prefix
    from edgemesh.testbed.scenario import load_scenario

    scen = load_scenario(scenario, nodes_dir=nodes)
    names = Names(prefix or derive_prefix(scen.name), run_root or DEFAULT_RUN_ROOT)
    return scen, names


def _running(scenario: str, prefix: Optional[str], run_root: Optional[Path], nodes: Optional[Path]):  # type: ignore[no-untyped-def]
    """(host caps, scenario, names, state) of a testbed that is up; a clear error if it is not."""
    from edgemesh.testbed.lifecycle import require_up

    caps = _host()
    scen, names = _load(scenario, prefix, run_root, nodes)
    return caps, scen, names, require_up(names)


def _host(*, netem: bool = TestbedSettings().netem):  # type: ignore[no-untyped-def]
    from edgemesh.testbed.host import probe_host, require_root_and_tools

    require_root_and_tools()
    return probe_host(allow_netem=netem)


@testbed_app.command()
def up(
    scenario: str = ScenarioArg,
    prefix: Optional[str] = PrefixOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the commands instead of running them (no root needed)."),
    netem: bool = typer.Option(TestbedSettings().netem, "--netem/--no-netem", help="Use tc netem for delay/loss when the kernel has it."),
    keep_on_failure: bool = typer.Option(False, "--keep-on-failure", help="Leave a half-built testbed for inspection."),
    run_root: Optional[Path] = RunRootOpt,
    nodes: Optional[Path] = NodesOpt,
) -> None:
    """Build the scenario: namespaces, routers with NAT, shaped links, cgroups, STUN/TURN."""
    from edgemesh.testbed.build import build_up
    from edgemesh.testbed.cgroups import CgroupLayout
    from edgemesh.testbed.host import HostCaps, is_root, probe_host
    from edgemesh.testbed.lifecycle import up as bring_up

    scen, names = _load(scenario, prefix, run_root, nodes)
    if dry_run:
        caps = probe_host(allow_netem=netem) if is_root() else HostCaps(netem=False, cgroups=CgroupLayout.detect(),
                                                                         turnserver="turnserver")
        print(f"# testbed {scen.name}: prefix {names.prefix}, netem {'yes' if caps.netem else 'no (userspace delay wire)'}")
        for step in build_up(scen, names, caps):
            print(step.render())
        return
    caps = _host(netem=netem)
    steps = build_up(scen, names, caps)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err, transient=False) as progress:
        task = progress.add_task(f"testbed {scen.name}", total=len(steps))

        def on_step(step) -> None:  # type: ignore[no-untyped-def]
            progress.update(task, advance=1, description=f"{scen.name}: {step.stage}")

        bring_up(scen, names, caps, on_step, keep_on_failure=keep_on_failure)
        progress.update(task, description=f"{scen.name}: up")
    delay = "netem" if caps.netem else "userspace delay wire"
    out.print(f"testbed [bold]{scen.name}[/] is up (prefix {names.prefix}, {len(scen.devices)} devices, delay by {delay}).")
    out.print(f"  run a command:  edgemesh testbed run {scenario} --on {scen.devices[0].name} -- edgemesh status")
    out.print(f"  measure links:  edgemesh testbed check {scenario}")
    out.print(f"  remove it:      edgemesh testbed down {scenario}")


@testbed_app.command()
def status(
    scenario: str = ScenarioArg,
    prefix: Optional[str] = PrefixOpt,
    json_path: Optional[str] = JsonOpt,
    run_root: Optional[Path] = RunRootOpt,
    nodes: Optional[Path] = NodesOpt,
) -> None:
    """What exists: devices, addresses, caps, helper processes."""
    from edgemesh.testbed.host import require_root_and_tools
    from edgemesh.testbed.inspect import inspect

    require_root_and_tools()
    scen, names = _load(scenario, prefix, run_root, nodes)
    from edgemesh.testbed.cgroups import CgroupLayout

    report = inspect(scen, names, CgroupLayout.detect())
    write_json(json_path, report, indent=2, note=err.print)
    if to_stdout(json_path):
        return
    if report["phase"] is None and not report["namespaces"]:
        out.print(f"testbed {scen.name} (prefix {names.prefix}) is not up.")
        return
    out.print(f"testbed [bold]{scen.name}[/] prefix {names.prefix}: {report['phase'] or 'no state file (leftovers)'}, "
              f"{len(report['namespaces'])} namespaces")
    table = Table("device", "site", "NAT", "address", "public", "link", "cpu", "memory", "procs")
    for d in report["devices"]:
        mem = f"{d['memory_used_mib']}/{d['memory_limit_mib']} MiB" if d["memory_limit_mib"] else f"{d['memory_used_mib']} MiB"
        table.add_row(d["name"], d["site"], d["nat"], d["address"], d["public"], d["link"],
                      f"{d['cpus']:g}" if d["cpus"] else "-", mem, str(d["processes"]))
    out.print(table)
    helpers = Table("helper", "pid", "alive")
    for h in report["helpers"]:
        helpers.add_row(h["label"], str(h["pid"]), "yes" if h["alive"] else "[red]no[/]")
    if report["helpers"]:
        out.print(helpers)


@testbed_app.command()
def run(
    scenario: str = ScenarioArg,
    command: Optional[List[str]] = typer.Argument(None, help="Command to run in the device (after --)."),
    on: Optional[str] = typer.Option(None, "--on", help="Device to run in (default: the workload's, else the first)."),
    daemons: bool = typer.Option(True, "--daemons/--no-daemons", help="Start edgemesh daemons first (bootstrap on the first device)."),
    prefix: Optional[str] = PrefixOpt,
    run_root: Optional[Path] = RunRootOpt,
    nodes: Optional[Path] = NodesOpt,
) -> None:
    """Start the daemons inside the devices, then run the workload or COMMAND in a device."""
    from edgemesh.testbed import lifecycle

    caps, scen, names, state = _running(scenario, prefix, run_root, nodes)
    if daemons:
        if not lifecycle.daemons_available(caps.python):
            err.print("note: this installation has no `edgemesh init --token-file` yet; not starting daemons")
        else:
            with err.status("starting edgemesh daemons") as spinner:
                lifecycle.start_daemons(scen, state, caps,
                                        on_device=lambda d: spinner.update(f"starting the edgemesh daemon on {d}"))
    argv: list[str] = list(command or [])
    device = on
    if not argv:
        if scen.workload is None:
            if daemons:
                argv = ["edgemesh", "status"]
            else:
                raise ConfigError("nothing to run: give a command after --, e.g. `-- edgemesh status`, or add a [workload]")
        else:
            argv = list(scen.workload.command)
            device = device or scen.workload.on
    device = device or scen.devices[0].name
    result = lifecycle.run_in_device(scen, names, caps, device, argv)
    raise typer.Exit(result.returncode)


@testbed_app.command()
def check(
    scenario: str = ScenarioArg,
    json_path: Optional[str] = JsonOpt,
    prefix: Optional[str] = PrefixOpt,
    run_root: Optional[Path] = RunRootOpt,
    nodes: Optional[Path] = NodesOpt,
) -> None:
    """Measure every shaped link (RTT, throughput, loss) and disk read cap, and compare with the scenario."""
    from edgemesh.testbed.build import layout
    from edgemesh.testbed.check import report_json, run_check, run_disk_checks, targets

    caps, scen, names, state = _running(scenario, prefix, run_root, nodes)
    lay = layout(scen, names, caps)
    total = len(targets(lay))
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  console=err, transient=True) as progress:
        task = progress.add_task("measuring", total=total)
        seen: list[str] = []

        def on_link(link: str) -> None:
            if seen:
                progress.update(task, advance=1)
            seen.append(link)
            progress.update(task, description=f"measuring {link}")

        ok, results = run_check(lay, state, caps.python, on_link)
        progress.update(task, description="measuring disk read caps")
        disks = run_disk_checks(lay, caps.python, caps)
        ok = ok and all(d.ok for d in disks)
    write_json(json_path, report_json(ok, results, disks), indent=2, note=err.print)
    if not to_stdout(json_path):
        table = Table("link", "RTT want", "RTT got", "Mbit/s want", "Mbit/s got", "loss want", "loss got", "ok")
        for r in results:
            table.add_row(
                r.link, f"{r.want_rtt_ms:.2f}", "-" if r.got_rtt_ms is None else f"{r.got_rtt_ms:.2f}",
                "-" if r.want_mbit is None else f"{r.want_mbit:g}",
                "-" if r.got_mbit is None else f"{r.got_mbit:.1f}" + (" (udp)" if r.method == "udp" else ""),
                f"{r.want_loss_pct:g}%", "-" if r.got_loss_pct is None else f"{r.got_loss_pct:.2f}%",
                ("[green]ok[/]" if r.ok else "[red]" + "; ".join(r.problems) + "[/]")
                + (f" ({r.attempts} measurements)" if r.attempts > 1 else ""),
            )
        out.print(table)
        if disks:
            dt = Table("device", "disk read cap MB/s", "measured MB/s", "ok")
            for d in disks:
                dt.add_row(d.device, f"{d.want_mbyte_s:g}", "-" if d.got_mbyte_s is None else f"{d.got_mbyte_s:.1f}",
                           "[green]ok[/]" if d.ok else f"[red]{d.problem}[/]")
            out.print(dt)
        out.print("[green]all links and disk caps within tolerance[/]" if ok else "[red]some links or disk caps are out of tolerance[/]")
    if not ok:
        raise typer.Exit(1)


@testbed_app.command()
def down(
    scenario: str = ScenarioArg,
    prefix: Optional[str] = PrefixOpt,
    run_root: Optional[Path] = RunRootOpt,
    nodes: Optional[Path] = NodesOpt,
) -> None:
    """Remove everything the testbed created, also after a crash (state file + prefix sweep)."""
    from edgemesh.testbed.cgroups import CgroupLayout
    from edgemesh.testbed.lifecycle import edgemesh_argv
    from edgemesh.testbed.teardown import teardown

    _host(netem=False)
    scen, names = _load(scenario, prefix, run_root, nodes)
    with err.status(f"removing testbed {scen.name} ({names.prefix})"):
        report = teardown(names, CgroupLayout.detect(), edgemesh_argv())
    if not report.removed_anything:
        out.print(f"testbed {scen.name} (prefix {names.prefix}): nothing to remove.")
    else:
        out.print(f"testbed {scen.name} removed: {len(report.namespaces)} namespaces, {len(report.processes)} processes, "
                  f"{len(report.cgroups)} cgroups, {len(report.dirs)} directories.")
    for problem in report.problems:
        err.print(f"[yellow]warning:[/] {problem}")
    if report.problems:
        sys.exit(1)
