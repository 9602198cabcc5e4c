"""CLI: `edgemesh bench anchors` — edgemesh, distributed-llama and llama.cpp decode on this machine, one run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from edgemesh.cli.bench import bench_app
from edgemesh.cli.output import json_option, table_console, write_json


@bench_app.command("anchors")
def bench_anchors(
    model: list[str] = typer.Option(["smollm2-135m-instruct", "smollm2-135m-instruct-int8"], "--model", "-m",
                                    help="edgemesh store model(s) to run (repeat the option)."),
    nodes: int = typer.Option(3, "--nodes", "-n", help="Processes of the split runs (all on this machine)."),
    wire: list[str] = typer.Option(["float32"], "--wire-dtype", help="edgemesh partial sums on the wire: float32, "
                                   "bfloat16, float16 or q8_0 (repeat for several rows)."),
    tokens: int = typer.Option(48, "--tokens", help="Decode steps per run."),
    reps: int = typer.Option(3, "--reps", help="Rounds; the systems alternate within each round; medians reported."),
    threads: int = typer.Option(2, "--threads", help="Threads of the one-device runs of the other systems."),
    store: Optional[Path] = typer.Option(None, "--store", help="edgemesh model store (default $EDGEMESH_HOME/models)."),
    dllama: Optional[Path] = typer.Option(None, "--dllama", help="distributed-llama's `dllama` binary."),
    dllama_model: Optional[Path] = typer.Option(None, "--dllama-model", help="Its converted model (.m)."),
    dllama_tokenizer: Optional[Path] = typer.Option(None, "--dllama-tokenizer", help="Its tokenizer (.t)."),
    llama_bench: Optional[Path] = typer.Option(None, "--llama-bench", help="llama.cpp's `llama-bench` binary."),
    gguf: Optional[Path] = typer.Option(None, "--gguf", help="The GGUF llama-bench runs."),
    json_path: Optional[str] = json_option("the results"),
) -> None:
    """Decode ms/token of edgemesh (1 device and --nodes members of a local cluster this command
    starts and stops) beside distributed-llama (1 node, --nodes nodes) and llama.cpp (1 device),
    interleaved in one run so that every ratio compares figures taken minutes apart on one host."""
    from edgemesh.bench.anchors import AnchorOptions, bench
    from edgemesh.cli.progress import PhaseProgress

    opts = AnchorOptions(nodes=nodes, tokens=tokens, reps=reps, threads=threads, models=list(model), wires=list(wire),
                         store=store,
                         dllama=dllama, dllama_model=dllama_model, dllama_tokenizer=dllama_tokenizer,
                         llama_bench=llama_bench, gguf=gguf)
    with PhaseProgress(Console(stderr=True)) as progress:
        r = bench(opts, progress=progress)
    out = table_console(json_path)
    t = Table(title=f"decode ms/token on this machine (median of {reps} rounds, load average {r['loadavg']})")
    for col in ("system", "1 device", f"{nodes} processes", "bytes/token", f"vs dllama 1", f"vs dllama {nodes}"):
        t.add_column(col)
    sysd = r["systems"]
    for key, med in sysd.items():
        name, _, n = key.partition(":")
        if name == "edgemesh":
            t.add_row(f"edgemesh {n}", str(med.get("single_ms_per_token", "")), str(med.get("ms_per_token", "")),
                      f"{med.get('bytes_per_token', 0):,.0f}", str(med.get("single_vs_dllama_1", "")),
                      str(med.get(f"nodes_vs_dllama_{nodes}", "")))
        elif n == "1":
            t.add_row(f"{name} ({threads} threads)", str(med["ms_per_token"]), "", "", "", "")
        else:
            t.add_row(f"{name} (1 thread each)", "", str(med["ms_per_token"]), f"{med.get('bytes_per_token', 0):,.0f}",
                      "", "")
    out.print(t)
    write_json(json_path, r, note=out.print)
