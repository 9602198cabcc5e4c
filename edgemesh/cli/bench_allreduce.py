"""CLI: `edgemesh bench allreduce` — star vs ring vs gloo, side by side (logic: edgemesh.bench.allreduce).

``--testbed SCENARIO`` (root) brings up the scenario's namespaces under a fresh prefix, runs rank k
in device k (its namespace and CPU/memory caps), and tears everything down on every exit path.
"""

from __future__ import annotations

import os
import secrets
import signal
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from edgemesh.cli.bench import bench_app, sigterm_as_exit
from edgemesh.cli.output import json_option, table_console, write_json
from edgemesh.bench.allreduce import EXTRA_METHODS, METHODS, SECURE, BenchConfig, BenchRow, Placement, auto_choice, fitted_cost, run_benchmark
from edgemesh.errors import ConfigError


def _parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--{what} takes comma-separated integers, got {text!r}") from None
    if not vals:
        raise ConfigError(f"--{what} is empty")
    return vals


class TestbedPlacement(Placement):
    """Rank k runs in device k of a testbed this object brings up; ``close()`` removes it."""

    def __init__(self, scenario_path: Path, on_step: Any = None) -> None:
        from edgemesh.testbed.addressing import AddressPlan
        from edgemesh.testbed.host import probe_host
        from edgemesh.testbed.lifecycle import up
        from edgemesh.testbed.naming import Names
        from edgemesh.testbed.scenario import load_scenario

        if os.geteuid() != 0:
            raise ConfigError("--testbed needs root (it creates network namespaces and cgroups)")
        self.scenario = load_scenario(scenario_path)
        self.names = Names("ar" + secrets.token_hex(2))
        self.caps = probe_host()
        self.plan = AddressPlan(self.scenario)
        self.devices = [d.name for d in self.scenario.devices]
        self.max_world = len(self.devices)
        self.up = False
        up(self.scenario, self.names, self.caps, on_step)  # tears down itself if it fails
        self.up = True

    def host(self, rank: int) -> str:
        return str(self.plan.device_address(self.devices[rank]))

    def argv(self, rank: int, argv: list[str]) -> list[str]:
        from edgemesh.testbed.lifecycle import device_argv

        return device_argv(self.names, self.caps, self.devices[rank], argv)  # execs: the pid stays our child's

    def env(self, rank: int) -> dict[str, str]:
        from edgemesh.testbed.lifecycle import device_env

        return device_env(self.scenario, self.names, self.devices[rank])

    def gloo_port(self) -> int:
        return 20000 + secrets.randbelow(20000)  # inside a fresh namespace nothing else listens

    def close(self) -> None:
        from edgemesh.testbed.lifecycle import edgemesh_argv
        from edgemesh.testbed.teardown import teardown

        if self.up:
            teardown(self.names, self.caps.cgroups, edgemesh_argv(self.caps.python))
            self.up = False


@bench_app.command("allreduce")
def bench_allreduce(
    quick: bool = typer.Option(False, "--quick", help="W = 2, 4; sizes 2 KiB, 16 KiB, 1 MiB; fewer reps (~30 s)."),
    worlds: Optional[str] = typer.Option(None, "--worlds", help="Comma-separated participant counts, e.g. 2,3,4."),
    sizes_kib: Optional[str] = typer.Option(None, "--sizes-kib", help="Comma-separated message sizes in KiB."),
    sizes_bytes: Optional[str] = typer.Option(None, "--sizes-bytes", help="Comma-separated message sizes in bytes "
                                              "(e.g. 2304: a SmolLM2 decode step's hidden state)."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated columns (default: all of "
                                          "star, chunked_star, ring, star_bf16, star_plain, *_zmq, gloo); also "
                                          "star_chacha / ring_chacha / chunked_star_chacha (TLS forced to "
                                          "ChaCha20-Poly1305) and star_ocb / ring_ocb / chunked_star_ocb (the "
                                          "hand-written links TLS replaced)."),
    reps: Optional[int] = typer.Option(None, "--reps", help="Timed batches per method and size (median reported)."),
    json_path: Optional[str] = json_option("the rows"),
    testbed: Optional[Path] = typer.Option(None, "--testbed", help="Run rank k in device k of this testbed scenario "
                                           "(e.g. emulation/lan-4.toml; root). Brought up and torn down by this command."),
) -> None:
    """Allreduce latency: W processes, star / chunked star / ring over our encrypted TCP links and over zmq CURVE,
    star over plain TCP, and gloo — on 127.0.0.1, or across a testbed's devices."""
    cfg = BenchConfig.quick() if quick else BenchConfig()
    if worlds:
        ws = _parse_ints(worlds, "worlds")
        if any(w < 2 or w > 16 for w in ws):
            raise ConfigError("--worlds must be between 2 and 16")
        cfg = BenchConfig(**{**cfg.__dict__, "worlds": ws})
    if sizes_kib:
        sz = _parse_ints(sizes_kib, "sizes-kib")
        if any(s < 1 for s in sz):
            raise ConfigError("--sizes-kib must be positive")
        cfg = BenchConfig(**{**cfg.__dict__, "sizes": tuple(s * 1024 for s in sz)})
    if sizes_bytes:
        sz = _parse_ints(sizes_bytes, "sizes-bytes")
        if any(s < 4 or s % 4 for s in sz):
            raise ConfigError("--sizes-bytes must be positive multiples of 4 (fp32)")
        cfg = BenchConfig(**{**cfg.__dict__, "sizes": tuple(sz)})
    if methods:
        ms = tuple(m.strip() for m in methods.split(",") if m.strip())
        unknown = sorted(set(ms) - set(METHODS) - set(EXTRA_METHODS))
        if unknown or not ms:
            raise ConfigError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from "
                              f"{', '.join(METHODS + EXTRA_METHODS)}")
        cfg = BenchConfig(**{**cfg.__dict__, "methods": ms})
    if reps is not None:
        if reps < 1:
            raise ConfigError("--reps must be at least 1")
        cfg = BenchConfig(**{**cfg.__dict__, "reps": reps})

    console = table_console(json_path)
    if not console.is_terminal:
        console = Console(width=160, stderr=console.stderr)  # piped to a file: do not squeeze the table to 80 columns
    placement: TestbedPlacement | None = None
    where = "127.0.0.1"
    previous = signal.signal(signal.SIGTERM, sigterm_as_exit)
    try:
        with console.status("starting participants…") as status:
            if testbed is not None:
                status.update(f"bringing up testbed {testbed}…")
                placement = TestbedPlacement(testbed)
                where = f"testbed {placement.scenario.name} (prefix {placement.names.prefix})"
            rows = run_benchmark(cfg, progress=lambda msg: status.update(f"measured {msg}"), placement=placement)
    finally:
        if placement is not None:
            placement.close()
        signal.signal(signal.SIGTERM, previous)
    _print(console, rows, where)
    write_json(json_path, [r.to_json() for r in rows], indent=2, note=console.print)


def _print(console: Console, rows: list[BenchRow], where: str) -> None:
    cost = fitted_cost(rows)
    methods = list(rows[0].us) if rows else []
    table = Table(title=f"allreduce on {where}: median µs per op, W processes sharing this machine's cores")
    table.add_column("W", justify="right", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    for m in methods:
        table.add_column(m.replace("_", " "), justify="right", no_wrap=True)
    table.add_column("best exact / gloo", justify="right", no_wrap=True)
    if cost is not None:
        table.add_column("model picks", justify="left", no_wrap=True)
    for r in rows:
        size = f"{r.bytes // 1024} KiB" if r.bytes < 1 << 20 else f"{r.bytes >> 20} MiB"
        cells = [str(r.w), size, *(f"{r.us[m]:,.0f}" for m in methods)]
        curve = [r.us[m] for m in SECURE if m in r.us]
        cells.append(f"{min(curve) / r.us['gloo']:.2f}×" if curve and "gloo" in r.us else "—")
        if cost is not None:
            cells.append(auto_choice(r, cost))
        table.add_row(*cells)
    console.print(table)
    if cost is not None:
        console.print(f"cost model t = a·hops + bytes/b fitted to the star, chunked star and ring columns: "
                      f"a = {cost.a * 1e6:.0f} µs per hop, b = {cost.b / 1e6:.0f} MB/s per link")
    console.print("star/chunked/ring/bf16: our TCP links (TLS 1.3, pair certificates from the node keys; AES-GCM, "
                  "or ChaCha20-Poly1305 without AES instructions); '… chacha': TLS forced to ChaCha20; '… ocb': "
                  "the hand-written X25519 + AES-256-OCB3 links TLS replaced; '… zmq': zmq CURVE; 'star plain': "
                  "TCP without crypto; gloo does not encrypt. "
                  "bf16 = fp32 parts sent as bfloat16 (not exact).")
