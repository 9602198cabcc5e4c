"""CLI: `edgemesh bench rpc` — RPC round trips and 1 MiB throughput, CURVE vs plain."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from edgemesh.cli.bench import bench_app
from edgemesh.cli.output import json_option, table_console, write_json


@bench_app.command("rpc")
def bench_rpc(
    json_path: Optional[str] = json_option("the results"),
    iters: int = typer.Option(2000, "--iters", help="Round trips per size (median reported)."),
    mib: int = typer.Option(512, "--mib", help="MiB sent for the throughput test."),
    rounds: int = typer.Option(3, "--rounds", help="Alternate plain/CURVE this many times; the best round of each is kept."),
) -> None:
    """RTT of 64 B and 16 KiB requests and throughput of 1 MiB frames on loopback, CURVE vs plain."""
    from edgemesh.bench.rpc import run_mode
    from edgemesh.runtime.local_cluster import free_port_pair

    console = Console(stderr=True)
    best: dict[str, list] = {"plain": [], "curve": []}
    with console.status("measuring…") as st:
        for r in range(rounds):
            for mode in ("plain", "curve"):  # interleaved so drift hits both alike
                st.update(f"round {r + 1}/{rounds}: {mode}")
                best[mode].append(run_mode(mode, free_port_pair(42000, set()), iters, mib))
    plain = min(best["plain"], key=lambda m: m.rtt_16k_us)
    curve = min(best["curve"], key=lambda m: m.rtt_16k_us)
    plain_mbps = max(m.mbps_1m for m in best["plain"])
    curve_mbps = max(m.mbps_1m for m in best["curve"])
    result = {
        "rtt_64_us": plain.rtt_64_us, "rtt_16k_us": plain.rtt_16k_us, "mbps_1m": plain_mbps,
        "curve_rtt_64_us": curve.rtt_64_us, "curve_rtt_16k_us": curve.rtt_16k_us, "curve_mbps_1m": curve_mbps,
        "curve_rtt_16k_ratio": round(curve.rtt_16k_us / plain.rtt_16k_us, 3),
        "iters": iters, "mib": mib, "rounds": rounds,
        "targets": {"curve_rtt_16k_ratio_max": 1.5, "curve_mbps_1m_min": 300},
    }
    t = Table(title="edgemesh RPC on loopback (median RTT, best of rounds)")
    for col in ("", "RTT 64 B (µs)", "RTT 16 KiB (µs)", "1 MiB frames (MB/s)"):
        t.add_column(col)
    t.add_row("plain", f"{plain.rtt_64_us:.0f}", f"{plain.rtt_16k_us:.0f}", f"{plain_mbps:.0f}")
    t.add_row("CURVE + ZAP", f"{curve.rtt_64_us:.0f}", f"{curve.rtt_16k_us:.0f}", f"{curve_mbps:.0f}")
    t.add_row("ratio", f"{curve.rtt_64_us / plain.rtt_64_us:.2f}×", f"{result['curve_rtt_16k_ratio']:.2f}× (target ≤ 1.5×)",
              f"{curve_mbps / plain_mbps:.2f}× (target ≥ 300 MB/s)")
    table_console(json_path).print(t)
    write_json(json_path, result, note=console.print)
