"""CLI: `edgemesh model synth|import|list` and `edgemesh plan` (parsing and printing only)."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgemesh.cli import app
from edgemesh.cli.output import json_option, to_stdout, write_json
from edgemesh.errors import ConfigError

model_app = typer.Typer(help="Models in the local store: import, synthesize, list.", no_args_is_help=True)
app.add_typer(model_app, name="model")

GiB = 1 << 30


def default_store_dir() -> Path:
    home = os.environ.get("EDGEMESH_HOME")
    if home:
        return Path(home) / "models"
    import platformdirs

    return Path(platformdirs.user_data_dir("edgemesh")) / "models"


def _store(store: Path | None):  # type: ignore[no-untyped-def]
    from edgemesh.weights.store import ModelStore

    return ModelStore(store or default_store_dir())


@contextmanager
def _progress(label: str) -> Iterator[object]:
    with Progress(TextColumn(f"[bold]{label}[/] {{task.description}}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task("", total=None)

        def update(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what)

        yield update


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 4 else f"{n / (1 << 20):.1f} MiB"


StoreOpt = typer.Option(None, "--store", help="store directory (default $EDGEMESH_HOME/models)")
QuantOpt = typer.Option("", "--quantize", help="store weight-only int8 (per-row scales) as NAME-int8: 'int8', "
                        "or 4-bit (a scale per 32 input columns) as NAME-q4: 'q4'")


@model_app.command("synth")
def synth(
    layers: int = typer.Option(..., "--layers", help="decoder layers"),
    hidden: int = typer.Option(..., "--hidden", help="hidden size"),
    heads: int = typer.Option(..., "--heads", help="query heads"),
    kv_heads: int = typer.Option(0, "--kv-heads", help="KV heads (default = heads)"),
    ffn: int = typer.Option(0, "--ffn", help="MLP intermediate size (default ≈ 8/3·hidden)"),
    vocab: int = typer.Option(32000, "--vocab", help="vocabulary size"),
    tied: bool = typer.Option(False, "--tied", help="tie lm_head to the embedding"),
    seed: int = typer.Option(0, "--seed"),
    name: str = typer.Option("", "--name", help="store name (default describes the shape)"),
    store: Path = StoreOpt,
    json_path: Optional[str] = json_option(),
    tokenizer: str = typer.Option("", "--tokenizer", help="borrow the tokenizer of this stored model (so it can be served)"),
    quantize: str = QuantOpt,
) -> None:
    """Write a random-weight Llama-shaped model (streams block by block: any size fits)."""
    from edgemesh.weights.config import ModelConfig
    from edgemesh.weights.quant import check_scheme
    from edgemesh.weights.synth import synth_model

    scheme = check_scheme(quantize)

    ffn = ffn or 256 * ((8 * hidden // 3 + 255) // 256)
    config = ModelConfig(hidden, ffn, heads, kv_heads or heads, layers, vocab, tie_word_embeddings=tied,
                         max_position_embeddings=4096)
    with _progress("synth") as bar:
        entry = synth_model(_store(store), config, seed=seed, name=name or None, progress=bar,  # type: ignore[arg-type]
                            aux_files=_borrowed_tokenizer(store, tokenizer, vocab), quantize=scheme)
    _print_entry(entry, json_path)


def _borrowed_tokenizer(store: Path | None, lender: str, vocab: int) -> dict[str, bytes]:
    if not lender:
        return {}
    from edgemesh.errors import ConfigError
    from edgemesh.llm.tokenizer import ChatTokenizer

    entry = _store(store).get(lender)
    size = ChatTokenizer.from_entry(entry).vocab_size
    if size > vocab:
        raise ConfigError(f"the tokenizer of {entry.name!r} has {size} tokens; use --vocab {size} or more")
    return {k: entry.path(k).read_bytes() for k in ("tokenizer.json", "tokenizer_config.json") if entry.has(k)}


@model_app.command("import")
def import_(
    path: str = typer.Argument(..., help="HF model directory, .gguf file, a bundled name (smollm2-135m-instruct), "
                                         "or with --quantize a model already in the store"),
    name: str = typer.Option("", "--name"),
    store: Path = StoreOpt,
    json_path: Optional[str] = json_option(),
    quantize: str = QuantOpt,
) -> None:
    """Import a model into the store (per-block safetensors, sha256 per file)."""
    from edgemesh.weights.bundled import BUNDLED, bundled_path
    from edgemesh.weights.quant import check_scheme, quantized_name

    scheme = check_scheme(quantize)
    src = Path(path)
    if not src.exists() and path in BUNDLED:
        name, src = name or quantized_name(path, scheme), bundled_path(path)
    if not src.exists() and scheme and (_store(store).root / path / "manifest.json").is_file():
        from edgemesh.weights.quant import quantize_entry

        st = _store(store)  # a float model already in the store: quantize it in place of a source
        with _progress("quantize") as bar:
            entry = quantize_entry(st, st.get(path), scheme, name=name or None, progress=bar)  # type: ignore[arg-type]
        _print_entry(entry, json_path)
        return
    if not src.exists():
        raise ConfigError(f"{path}: no such file or directory (nor a bundled model: {', '.join(BUNDLED)})")
    with _progress("import") as bar:
        if src.is_dir():
            from edgemesh.weights.hf_import import import_hf

            entry = import_hf(_store(store), src, name=name or None, progress=bar, quantize=scheme)  # type: ignore[arg-type]
        elif src.suffix == ".gguf":
            from edgemesh.weights.gguf_import import import_gguf

            entry = import_gguf(_store(store), src, name=name or None, progress=bar, quantize=scheme)  # type: ignore[arg-type]
        else:
            raise ConfigError(f"{src}: expected a HF model directory or a .gguf file")
    _print_entry(entry, json_path)


def _entry_json(e) -> dict[str, object]:  # type: ignore[no-untyped-def]
    c = e.config
    return {"name": e.name, "id": e.id, "source": e.source, "dtype": e.dtype, "bytes": e.nbytes(),
            "parameters": c.num_parameters(), "layers": c.num_hidden_layers, "hidden": c.hidden_size,
            "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads, "ffn": c.intermediate_size,
            "vocab": c.vocab_size, "tokenizer": e.has("tokenizer.json"), "path": str(e.root)}


def _print_entry(entry, json_path: str | None) -> None:  # type: ignore[no-untyped-def]
    write_json(json_path, _entry_json(entry), default=str, note=Console(stderr=True).print)
    if not to_stdout(json_path):
        d = _entry_json(entry)
        Console().print(f"[green]stored[/] {d['name']}  id {str(d['id'])[:12]}  {d['parameters']:,} params  "
                        f"{d['dtype']}  {_size(int(d['bytes']))}  → {d['path']}")  # type: ignore[arg-type]


@model_app.command("list")
def list_(store: Path = StoreOpt, json_path: Optional[str] = json_option("the models")) -> None:
    """Models in the store."""
    entries = [_entry_json(e) for e in _store(store).list()]
    write_json(json_path, entries, default=str, note=Console(stderr=True).print)
    if to_stdout(json_path):
        return
    t = Table(title=f"models in {_store(store).root}")
    for col in ("name", "id", "params", "dtype", "size", "L", "H", "heads/kv", "ffn", "vocab", "source"):
        t.add_column(col)
    for d in entries:
        t.add_row(str(d["name"]), str(d["id"])[:12], f"{int(d['parameters']) / 1e6:.1f} M",  # type: ignore[call-overload]
                  str(d["dtype"]), _size(int(d["bytes"])), str(d["layers"]), str(d["hidden"]),  # type: ignore[call-overload]
                  f"{d['heads']}/{d['kv_heads']}", str(d["ffn"]), str(d["vocab"]), str(d["source"]))
    Console().print(t)


def _live_cluster(state_dir: Path | None, nodes: int):  # type: ignore[no-untyped-def]
    """(members, devices, links) of the running cluster as a launch would see them, or None."""
    import asyncio

    from edgemesh.cli.node import resolve_state
    from edgemesh.config import LaunchOptions
    from edgemesh.runtime.deploy import live_devices

    from edgemesh.cli.progress import PhaseProgress

    with PhaseProgress(Console(stderr=True), "asking the cluster's members for their status, profiles and links"):
        return asyncio.run(live_devices(resolve_state(state_dir), LaunchOptions(nodes=nodes or None)))


@app.command("plan")
def plan_cmd(
    model: str = typer.Argument(..., help="model name (or id prefix) in the store"),
    nodes: int = typer.Option(0, "--nodes", help="plan for N identical devices (this machine's memory / N)"),
    devices: str = typer.Option("", "--devices", help="device profile files, a glob like 'nodes/*.toml' (first = master)"),
    more: list[Path] = typer.Argument(None, help="more device profile files (an unquoted glob expands here)", show_default=False),
    gflops: float = typer.Option(50.0, "--gflops", help="GFLOP/s per device (--nodes) or per core (--devices)"),
    context: int = typer.Option(2048, "--context", help="context length the KV cache is sized for"),
    store: Path = StoreOpt,
    json_path: Optional[str] = json_option(),
    state_dir: Path = typer.Option(None, "--state-dir", help="the node whose cluster to plan for (default: this device's node, else the local cluster)"),
    uniform: bool = typer.Option(False, "--uniform", help="plan for --nodes identical devices of --gflops even when a cluster runs"),
    memory_budget: str = typer.Option("", "--memory-budget", help="memory per device (e.g. 2GiB, 384MiB): stream weights "
                                      "from disk through a small window when they do not fit"),
    disk: float = typer.Option(0.0, "--disk-mbyte-s", help="disk read MB/s of --nodes devices (for the no-stall check)"),
) -> None:
    """Show who holds which slice, predicted memory per device and predicted ms/token.

    With a running cluster the plan uses its members' measured profiles and links, exactly as
    `edgemesh launch` would (--nodes = how many members); otherwise --devices profile files, or
    --nodes identical devices of this machine's memory."""
    from dataclasses import replace

    from edgemesh.placement import Device, uniform_devices
    from edgemesh.placement.budget import plan_with_budget
    from edgemesh.placement.memory import parse_size

    import glob

    entry = _store(store).get(model)
    files = [Path(f) for f in sorted(glob.glob(devices))] if devices else []
    if devices and not files:
        raise ConfigError(f"--devices {devices!r}: no such file")
    files += list(more or [])
    if files:
        devs = []
        for p in files:
            try:
                data = tomllib.loads(p.read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"{p}: cannot read device profile ({exc})") from None
            dev_id = str(data.get("name", p.stem))
            if any(d.id == dev_id for d in devs):
                dev_id = f"{dev_id}-{len(devs)}"
            devs.append(Device.from_profile(dev_id, data, gflops_per_core=gflops))
    links = None
    names: dict[str, str] = {}
    source = f"{nodes or 1} identical device(s) of {gflops:g} GFLOP/s" if not files else "device profile files"
    live = None if files or uniform else _live_cluster(state_dir, nodes)
    left_out: list[str] = []
    if live is not None:
        members, devs, links, left_out = live
        names = {m["id"]: m["name"] for m in members}
        source = "the running cluster's measured profiles and links"
    elif not files:
        import psutil

        n = nodes or 1
        devs = [replace(d, disk_mbyte_s=disk) for d in
                uniform_devices(n, gflops=gflops, mem_bytes=psutil.virtual_memory().total // n, mem_bw_gbps=10.0)]
    from edgemesh.weights.quant import split_unit

    budget = parse_size(memory_budget) if memory_budget else None
    p = plan_with_budget(entry.config, devs, links, model=entry.name, context_len=context,
                         dtype_bytes=entry.param_bytes, budget_bytes=budget, mlp_unit=split_unit(entry.dtype))
    p.notes = left_out + p.notes  # members that cannot share a group with this node, then the planner's
    write_json(json_path, p.to_json(), note=Console(stderr=True).print)
    if to_stdout(json_path):
        return
    t = Table(title=f"plan for {entry.name} on {p.world_size} device(s), context {context}, from {source}")
    for col in ("rank", "device", "share", "KV groups", "MLP rows", "weights", "KV cache", "memory", "limit", "compute ms"):
        t.add_column(col, justify="right" if col not in ("device",) else "left")
    for d in p.devices:
        t.add_row(str(d.rank), names.get(d.id, d.id), f"{d.share:.1%}", str(d.kv_groups), str(d.mlp_rows), _size(d.weight_bytes),
                  _size(d.kv_cache_bytes), _size(d.mem_bytes), _size(d.mem_limit), f"{d.compute_ms:.2f}")
    con = Console()
    con.print(t)
    lat = p.latency
    con.print(f"predicted ms/token: [bold]{lat.total_ms:.2f}[/] = compute {lat.compute_ms:.2f} "
              f"+ allreduce latency {lat.allreduce_latency_ms:.2f} ({lat.allreduces_per_token} allreduces) "
              f"+ bandwidth {lat.bandwidth_ms:.2f} ({lat.bytes_per_token / 1024:.0f} KiB/token on the hub link)")
    if budget:
        _print_window_checks(con, p, names)
    print_notes(con, p.notes)


def _print_window_checks(con: Console, p, names: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    def ms(x: float | None) -> str:
        return "?" if x is None else f"{x:.1f}"

    def mib(n: int) -> str:
        return f"{n / (1 << 20):.0f}"

    how = f"a {p.window}-block weight window" if p.window else "all weights in memory"
    t = Table(title=f"memory budget {_size(p.memory_budget)} per device: {how}")
    for col in ("device", "peak / limit MiB", "runtime+weights+KV+act MiB", "t_a / t_f / t_ar ms",
                "τ_a / τ_f ms (disk MB/s)", "no stall (stall ms/token)"):
        t.add_column(col, justify="left" if col == "device" else "right")
    for c in p.window_checks:
        ok = {True: "[green]yes[/]", False: "[red]no[/]", None: "?"}[c["no_stall"]]
        disk = f"{c['disk_mbyte_s']:.0f}" if c["disk_mbyte_s"] else "?"
        t.add_row(names.get(c["id"], c["id"]), f"{mib(c['peak_bytes'])} / {mib(c['limit_bytes'])}",
                  "+".join(mib(c[k]) for k in ("baseline_bytes", "weights_bytes", "kv_cache_bytes", "activation_bytes")),
                  f"{ms(c['t_a_ms'])} / {ms(c['t_f_ms'])} / {ms(c['t_ar_ms'])}",
                  f"{ms(c['tau_a_ms'])} / {ms(c['tau_f_ms'])} ({disk})",
                  f"{ok} ({ms(c['stall_ms_per_token'])})" if p.window else "-")
    con.print(t)
    con.print("no stall: t_a + t_ar ≥ τ_f and t_f + t_ar ≥ τ_a (compute from GFLOP/s and memory bandwidth, "
              "t_ar from the links, τ from the disk read speed)")


def print_notes(con: Console, notes: list[str]) -> None:
    from rich.markup import escape

    for note in notes:
        con.print(f"[yellow]note[/] {escape(note)}")  # member names come from the members
