"""CLI: `edgemesh bench generate MODEL --nodes N` — decode speed, N devices vs one vs the bound."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from edgemesh.cli.bench import bench_app, sigterm_as_exit
from edgemesh.cli.output import json_option, table_console, write_json
from edgemesh.errors import ConfigError


@bench_app.command("generate")
def bench_generate(
    model: str = typer.Argument(..., help="A model in the store."),
    nodes: int = typer.Option(3, "--nodes", "-n", help="Members to split over (this one included)."),
    tokens: int = typer.Option(32, "--tokens", help="Decode steps to time (median reported)."),
    prompt_tokens: int = typer.Option(16, "--prompt-tokens", help="Prompt length (token ids)."),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir"),
    store: Optional[Path] = typer.Option(None, "--store"),
    json_path: Optional[str] = json_option("the results"),
    wire_dtype: Optional[str] = typer.Option(
        None, "--wire-dtype", help="Partial sums on the wire as float16, bfloat16 or q8_0 (default: exact fp32); "
                                   "bytes/token and its theory follow it."),
    speculate: Optional[str] = typer.Option(
        None, "--speculate", help="lookup | draft:MODEL: instead, plain vs speculative decoding side by side on "
                                  "N members for three prompt kinds (rewrite, code edit, open chat); --tokens "
                                  "is then the most tokens per answer."),
    testbed: Optional[Path] = typer.Option(
        None, "--testbed", help="Run on this testbed scenario's devices instead (root): brings it up under a fresh "
                                "prefix, starts a daemon per device, copies MODEL into the first device's store, "
                                "runs there (1 device = that device alone, at its caps) and tears it all down."),
) -> None:
    """TTFT, ms/token, tokens/s and bytes/token on N members, against one device and the analytic bound."""
    from edgemesh.cli.model import default_store_dir
    from edgemesh.cli.node import resolve_state
    from edgemesh.bench.generate import bench
    from edgemesh.weights.store import ModelStore

    if wire_dtype not in (None, "float16", "bfloat16", "q8_0"):
        raise ConfigError(f"--wire-dtype must be float16, bfloat16 or q8_0 (got {wire_dtype!r})")
    if tokens < 2 or prompt_tokens < 1 or nodes < 1 or (nodes < 2 and speculate is None):
        raise ConfigError("--tokens ≥ 2, --prompt-tokens ≥ 1 and --nodes ≥ 2 please")
    entry = ModelStore(store or default_store_dir()).get(model)
    if testbed is not None:
        if speculate is not None or state_dir is not None:
            raise ConfigError("--testbed runs its own cluster: it takes neither --speculate nor --state-dir")
        args = [model, "--nodes", str(nodes), "--tokens", str(tokens), "--prompt-tokens", str(prompt_tokens)]
        _print(_on_testbed(testbed, entry.root, nodes, args + (["--wire-dtype", wire_dtype] if wire_dtype else [])),
               json_path)
        return
    if speculate is not None:
        _bench_speculate(resolve_state(state_dir), entry, store or default_store_dir(), nodes, speculate, tokens,
                         json_path)
        return
    prompt = [(i * 7 + 3) % entry.config.vocab_size for i in range(prompt_tokens)]
    err = Console(stderr=True)
    from edgemesh.cli.progress import PhaseProgress

    with PhaseProgress(err) as progress:
        r = asyncio.run(bench(resolve_state(state_dir), entry, nodes, prompt, tokens, 2048, progress=progress,
                              wire_dtype=wire_dtype))
    _print(r, json_path)


def _on_testbed(scenario: Path, entry_root: Path, nodes: int, args: list[str]) -> dict:
    import signal

    from edgemesh.bench.on_testbed import GenerateBed
    from edgemesh.cli.progress import PhaseProgress

    previous = signal.signal(signal.SIGTERM, sigterm_as_exit)  # unwinds through close()
    try:
        with PhaseProgress(Console(stderr=True)) as progress:
            bed = GenerateBed(scenario, progress)
            try:
                bed.open(nodes)
                bed.install(entry_root)
                bed.wait_members(nodes)
                r = bed.run_bench(args)
            finally:
                bed.close()
    finally:
        signal.signal(signal.SIGTERM, previous)
    r["testbed"] = {"scenario": bed.scenario.name, "devices": [d.name for d in bed.scenario.devices[:nodes]]}
    return r


def _print(r: dict, json_path: Optional[str]) -> None:
    err = Console(stderr=True)
    where = f" on testbed {r['testbed']['scenario']}" if r.get("testbed") else ""
    t = Table(title=f"{r['model']}{where}: decode, {r['tokens']} tokens after a {r['prompt_tokens']}-token prompt")
    for col in ("", "TTFT ms", "ms/token", "tokens/s", "bytes/token"):
        t.add_column(col)
    t.add_row("1 device", f"{r['single_ttft_ms']:.0f}", f"{r['single_ms_per_token']:.1f}", f"{r['single_tokens_per_s']:.1f}", "-")
    t.add_row(f"{r['nodes']} devices", f"{r['ttft_ms']:.0f}", f"{r['ms_per_token']:.1f}", f"{r['tokens_per_s']:.1f}",
              f"{r['bytes_per_token']:,}")
    bound = r["bound_ms_per_token"]
    t.add_row("bound", "", f"{bound:.1f}" if bound else "-", "", f"{r['bytes_per_token_theory']:,} (theory)")
    table_console(json_path).print(t)
    # Through shared memory only a few small messages are on the wire: their framing, not the
    # payload the target is about, makes up the difference.
    bytes_note = "allreduces through shared memory: the rest is framing" if r.get("shared_memory") else "target ≤ 1.05"
    err.print(f"bound = slowest slice {r['largest_slice_compute_ms']} ms (rank {r['largest_slice_rank']}, all ranks "
              f"computing at once; alone: {r['largest_slice_alone_ms']} ms) + 2·L × star "
              f"{r['star_allreduce_us']} µs; ms/token / bound = {r['ms_per_token'] / bound:.2f} (target ≤ 1.25); "
              f"bytes / theory = {r['bytes_per_token'] / max(r['bytes_per_token_theory'], 1):.3f} ({bytes_note}); "
              f"planner predicted {r['predicted_ms_per_token']} ms/token")
    if r.get("prefill_ms") is not None:
        err.print(f"prefill of a {r['prefill_tokens']}-token prompt (TTFT): {r['prefill_ms']} ms on {r['nodes']} devices, "
                  f"{r['single_prefill_ms']} ms on 1; compute per token by rank (ms): {r['ms_per_token_by_rank']}; "
                  f"compute of that prefill by rank, all at once (ms): {r.get('prefill_ms_by_rank')}")
    if r.get("link_cost") and r.get("algorithms"):
        c, a = r["link_cost"], r["algorithms"]
        err.print(f"links as the cost model sees them: {c['hop_us']:g} µs per hop, {c['mbyte_s']:g} MB/s; "
                  f"allreduce: {a['decode']} per decode step, {a['prefill']} per prefill message")
    inside = r.get("master_in_collectives_ms_per_token")
    if inside is not None:
        err.print(f"the master spent {inside} ms/token inside collectives (transport + waiting for the slowest "
                  f"worker) and the rest computing")
    write_json(json_path, r, note=err.print)


def _bench_speculate(state, entry, store_dir, nodes, mode, tokens, json_path) -> None:  # type: ignore[no-untyped-def]
    from edgemesh.bench.speculate import bench_speculate
    from edgemesh.cli.progress import PhaseProgress

    if mode not in ("lookup",) and not mode.startswith("draft:"):
        raise ConfigError(f"--speculate must be lookup or draft:MODEL (got {mode!r})")
    if not entry.has("tokenizer.json"):
        raise ConfigError(f"model {entry.name!r} has no tokenizer: the prompt kinds need one")
    err = Console(stderr=True)
    with PhaseProgress(err) as progress:
        r = asyncio.run(bench_speculate(state, entry, store_dir, nodes, mode, tokens, 2048, progress))
    t = Table(title=f"{r['model']} on {r['nodes']} device(s): plain vs speculative ({mode}), greedy, ≤ {tokens} tokens")
    for col in ("prompt", "tokens", "plain ms/token", "speculative ms/token", "speed-up", "accepted/proposed",
                "per step", "identical"):
        t.add_column(col)
    for kind, k in r["by_kind"].items():
        t.add_row(kind, str(k["tokens"]), f"{k['ms_per_token_plain']:.1f}", f"{k['ms_per_token_speculative']:.1f}",
                  f"{k['speedup']:.2f}×", f"{k['accepted']}/{k['proposed']}" + (" (off)" if k["switched_off"] else ""),
                  f"{k['mean_accepted_per_step']:.2f}", "yes" if k["identical_greedy"] else "NO")
    table_console(json_path).print(t)
    write_json(json_path, r, note=err.print)
