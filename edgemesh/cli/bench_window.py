"""CLI: `edgemesh bench window` — all weights in memory vs. streamed through a sliding window."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from edgemesh.cli.bench import bench_app
from edgemesh.cli.output import json_option, table_console, write_json
from edgemesh.errors import ConfigError


@bench_app.command("window")
def bench_window(
    size: str = typer.Option("2GB", "--size", help="fp32 size of the random model (e.g. 2GB, 512MB)."),
    members: int = typer.Option(2, "--members", help="Members (1 or 2, processes on this machine over loopback)."),
    windows: str = typer.Option("2,3", "--windows", help="Window sizes to run (blocks)."),
    tokens: int = typer.Option(8, "--tokens", help="Timed decode steps (median reported)."),
    prompt_tokens: int = typer.Option(16, "--prompt-tokens", help="Prompt length."),
    threads: int = typer.Option(1, "--threads", help="Torch threads per member."),
    reps: int = typer.Option(1, "--reps", help="Repeat the memory and window runs, alternating; medians are reported "
                                               "(a shared or virtual host varies by 10-20 % from run to run)."),
    budget: Optional[str] = typer.Option(None, "--budget", help="Memory budget for the budget run (default: between "
                                                               "what a 2-block window and all-in-memory need)."),
    page_cache: bool = typer.Option(True, "--page-cache/--no-page-cache", help="Also run the first window with "
                                                                              "reads left in the page cache."),
    enforce: bool = typer.Option(True, "--enforce/--no-enforce", help="Run the budget run in a memory cgroup capped "
                                                                     "at the budget (root, cgroup v1)."),
    store: Optional[Path] = typer.Option(None, "--store", help="Model store (the random model is written once and kept)."),
    json_path: Optional[str] = json_option("the results"),
) -> None:
    """ms/token, peak RSS vs the predictor, and t_a, t_f, t_ar, τ_a, τ_f with weights in memory and streamed."""
    from edgemesh.bench.window import BenchOptions, bench
    from edgemesh.cli.model import default_store_dir
    from edgemesh.placement.memory import parse_size

    try:
        wins = tuple(int(x) for x in windows.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--windows {windows!r}: comma-separated integers, e.g. 2,3") from None
    if not wins or tokens < 2 or prompt_tokens < 1 or threads < 1 or reps < 1:
        raise ConfigError("--windows needs at least one size; --tokens ≥ 2, --prompt-tokens ≥ 1, --threads ≥ 1, --reps ≥ 1")
    opts = BenchOptions(size_bytes=parse_size(size), members=members, windows=wins, tokens=tokens,
                        prompt_tokens=prompt_tokens, threads=threads, page_cache_run=page_cache,
                        budget_bytes=parse_size(budget) if budget else None, enforce=enforce, reps=reps)
    err = Console(stderr=True)
    with err.status("…") as st:
        r = bench(store or default_store_dir(), opts, progress=lambda m: st.update(m))
    t = Table(title=f"{r['model']} ({r['bytes'] / 1e9:.2f} GB fp32) on {r['members']} member(s): "
                    f"{r['tokens']} decode steps after a {r['prompt_tokens']}-token prompt")
    for col in ("run", "reads", "ms/token", "prefill ms", "peak RSS MB", "predicted MB", "page cache MB", "stall ms/tok",
                "disk MB/s"):
        t.add_column(col, justify="left" if col in ("run", "reads") else "right")
    for run in r["runs"]:
        if "error" in run:
            t.add_row(run["label"], run["cache"], f"[red]{run['error'][:60]}[/]", "", "", "", "", "", "")
            continue
        stats = run["stats"]
        t.add_row(run["label"], run["cache"], f"{run['ms_per_token']:.1f}", f"{run['prefill_ms']:.0f}",
                  " / ".join(f"{x:.0f}" for x in run["peak_rss_mb"]),
                  " / ".join(f"{x:.0f}" for x in run["predicted_peak_mb"]),
                  " / ".join("?" if x is None else f"{x:.0f}" for x in run["page_cache_mb"]),
                  " / ".join(f"{s.get('stall_ms_per_token', 0):.1f}" for s in stats) if run["window"] else "-",
                  " / ".join(f"{s.get('read_mbyte_s', 0):.0f}" for s in stats) if run["window"] else "-")
    table_console(json_path).print(t)
    if "ms_per_token_window" in r:
        err.print(f"window w={r['window']} (cold) / all in memory: {r['window_vs_memory']:.2f}× ms/token "
                  f"(target ≤ 1.15 where no-stall holds); peak RSS / predicted {r['rss_over_predicted']:.2f} "
                  f"(target ≤ 1.2); window RSS / all-in-memory RSS {r['rss_window_over_memory']:.2f} (target ≤ 0.33)")
        err.print(f"t_a {r['t_a_ms']:.2f} ms, t_f {r['t_f_ms']:.2f} ms, t_ar {r['t_ar_ms']:.2f} ms (all in memory); "
                  f"τ_a {r['tau_a_ms']:.2f} ms, τ_f {r['tau_f_ms']:.2f} ms at {r['disk_mbyte_s']:.0f} MB/s (cold); "
                  f"no-stall predicted: {r['no_stall_predicted']}; greedy tokens identical: {r['same_tokens']}")
        pre = r.get("prefill")
        if pre:
            err.print(f"prefill of {pre['prompt_tokens']} tokens (steady state, the second prompt): window / memory "
                      f"{pre['window_vs_memory']:.2f}×; a fresh process's first prompt {pre['first_window_vs_memory']:.2f}× "
                      f"(t_a {pre['t_a_ms']:.1f}, t_f {pre['t_f_ms']:.1f}, t_ar {pre['t_ar_ms']:.1f} ms vs τ_a "
                      f"{pre['tau_a_ms']:.1f}, τ_f {pre['tau_f_ms']:.1f} ms; no-stall predicted: {pre['no_stall_predicted']})")
    b = r.get("budget", {})
    if b:
        err.print(f"budget {b['budget_mb']:.0f} MB: all in memory needs {b['all_in_memory_needs_mb']:.0f} MB; "
                  + (f"planner chose w={b['planned_window']}" if "planned_window" in b else f"refused: {b.get('refused')}")
                  + (f"; cgroup peak usage {b['cgroup_max_usage_mb']} MB (counts page cache), OOM kills "
                     f"{b['cgroup_oom_kills']}" if "cgroup_max_usage_mb" in b else f"; {b.get('cgroup', '')}")
                  + (f"; all in memory under the cap: {b['all_in_memory_under_cap']}" if "all_in_memory_under_cap" in b else ""))
    write_json(json_path, r, note=err.print)
