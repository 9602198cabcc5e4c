"""CLI: `edgemesh vit train|split|eval` — class-subset ViT splits (ED-ViT); parsing and printing only."""

from __future__ import annotations

import glob
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from edgemesh.cli import app
from edgemesh.cli.output import json_option, table_console, write_json
from edgemesh.errors import ConfigError

vit_app = typer.Typer(help="Vision transformers split into class-subset sub-models (ED-ViT): train, split, eval.",
                      no_args_is_help=True)
app.add_typer(vit_app, name="vit")

StoreOpt = typer.Option(None, "--store", help="Where ViT models live (default $EDGEMESH_HOME/models/vit).")
LimitOpt = typer.Option(0, "--limit", help="Use only the first N training images (0 = all): quicker runs.")


@contextmanager
def progress_bar(label: str) -> Iterator[Any]:
    """A rich progress bar fed by the (description, done, total) callbacks of edgemesh.vit."""
    with Progress(TextColumn(f"[bold]{label}[/] {{task.description}}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=False) as bar:
        tasks: dict[str, Any] = {}

        def update(desc: str, done: int, total: int) -> None:
            key = desc.split(" epoch ")[0]
            if key not in tasks:
                tasks[key] = bar.add_task(desc, total=total)
            bar.update(tasks[key], completed=done, total=total, description=desc)

        yield update


def read_devices(pattern: str) -> list[Any]:
    """Devices from profile files (``nodes/*.toml``), in file-name order."""
    from edgemesh.placement.devices import Device

    files = sorted(glob.glob(pattern))
    if not files:
        raise ConfigError(f"--devices {pattern!r}: no such file")
    devs: list[Device] = []
    for f in files:
        try:
            data = tomllib.loads(Path(f).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{f}: cannot read device profile ({exc})") from None
        dev_id = str(data.get("name", Path(f).stem))
        if any(d.id == dev_id for d in devs):
            dev_id = f"{dev_id}-{len(devs)}"
        devs.append(Device.from_profile(dev_id, data))
    return devs


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


@vit_app.command("train")
def train(
    dataset: str = typer.Option(..., "--dataset", help="digits, mnist or fashion-mnist (installed offline)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Model directory (default <store>/vit-<dataset>)."),
    name: str = typer.Option("", "--name", help="Name in the store (default vit-<dataset>)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs (default: the dataset's recipe)."),
    seed: int = typer.Option(0, "--seed"),
    limit: int = LimitOpt,
    threads: int = typer.Option(1, "--threads", help="torch threads (1 is fastest for these small models on a busy CPU)."),
    store: Optional[Path] = StoreOpt,
) -> None:
    """Train a small ViT on an offline dataset and save it (safetensors + JSON)."""
    from edgemesh.vit.datasets import load_dataset
    from edgemesh.vit.recipes import recipe_for, train_model
    from edgemesh.vit.store import check_name, default_vit_dir, save_model
    from edgemesh.vit.train import evaluate, torch_threads

    data = load_dataset(dataset).limited(train=limit)
    recipe = recipe_for(dataset).with_epochs(epochs, seed)
    directory = out or (store or default_vit_dir()) / check_name(name or f"vit-{dataset}")
    t0 = time.perf_counter()
    with torch_threads(threads), progress_bar("train") as bar:
        model = train_model(data, recipe, progress=bar)
        acc = evaluate(model, data.test_x, data.test_y)
    seconds = time.perf_counter() - t0
    info = save_model(directory, model, {"dataset": dataset, "accuracy": acc, "epochs": recipe.train.epochs,
                                         "seed": seed, "train_samples": len(data.train_y),
                                         "seconds": round(seconds, 1)})
    t = Table(title=f"ViT trained on {dataset}")
    for col in ("model", "test accuracy", "params", "FLOPs/image", "epochs", "train images", "time"):
        t.add_column(col)
    t.add_row(str(directory), _pct(acc), f"{info['params']:,}", f"{info['flops']:,}", str(recipe.train.epochs),
              f"{len(data.train_y):,}", f"{seconds:.0f} s")
    Console().print(t)


@vit_app.command("split")
def split(
    model: str = typer.Argument(..., help="A trained model: name in the store or directory."),
    parts: int = typer.Option(..., "--parts", help="Number of sub-models N (each ≤ 1/N of the parameters)."),
    devices: str = typer.Option("", "--devices", help="Device profiles to place the parts on, a glob like 'nodes/*.toml'."),
    out: Optional[Path] = typer.Option(None, "--out", help="Split directory (default <store>/<model>-split<N>)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Fine-tuning epochs per part (default: recipe)."),
    seed: int = typer.Option(0, "--seed"),
    weights: str = typer.Option("", "--weights", help="Class-share per part, e.g. '2,1,1' (default: equal)."),
    limit: int = LimitOpt,
    threads: int = typer.Option(1, "--threads"),
    store: Optional[Path] = StoreOpt,
) -> None:
    """Split a trained ViT into N class-subset sub-models plus a fusion MLP, and place them."""
    from edgemesh.bench.vit import place
    from edgemesh.vit.datasets import load_dataset
    from edgemesh.vit.recipes import recipe_for
    from edgemesh.vit.split import build_split
    from edgemesh.vit.store import default_vit_dir, load_model, resolve, save_split
    from edgemesh.vit.train import torch_threads

    src = resolve(model, store, "model")
    full, info = load_model(src)
    dataset = str(info.get("dataset", ""))
    data = load_dataset(dataset).limited(train=limit)
    recipe = recipe_for(dataset).with_epochs(epochs, seed)
    w = None
    if weights:
        try:
            w = [float(x) for x in weights.split(",")]
        except ValueError:
            raise ConfigError(f"--weights {weights!r}: expected numbers separated by commas") from None
    devs = read_devices(devices) if devices else []
    directory = out or (store or default_vit_dir()) / f"{src.name}-split{parts}"
    with torch_threads(threads), progress_bar("split") as bar:
        s = build_split(full, data, parts, recipe.split, weights=w, progress=bar)
    s.meta.update({"source_model": str(src.resolve()), "source_sha256": info["weights"]["sha256"]})
    placement = place(s, devs) if devs else None
    manifest = save_split(directory, s, placement=placement.to_json() if placement else None)
    t = Table(title=f"{src.name} split into {parts} parts → {directory}")
    for col in ("part", "classes", "params", "of full", "FLOPs/image", "device", "predicted ms"):
        t.add_column(col)
    for p in manifest["parts"]:
        dev = placement.device_of(p["name"]) if placement else "-"
        ms = f"{placement.latency_ms(p['name']):.3f}" if placement else "-"
        t.add_row(p["name"], ", ".join(p["labels"]), f"{p['params']:,}", f"{p['params'] / info['params']:.3f}",
                  f"{p['flops']:,}", dev, ms)
    Console().print(t)
    if placement:
        Console().print(f"predicted makespan (parts in parallel, no network): {placement.makespan_ms:.3f} ms")


@vit_app.command("eval")
def eval_(
    split_dir: str = typer.Argument(..., help="A split: name in the store or directory."),
    model: str = typer.Option("", "--model", help="The full model to compare with (default: the split's source)."),
    devices: str = typer.Option("", "--devices", help="Device profiles for predicted latency (default: the split's placement)."),
    repeats: int = typer.Option(50, "--repeats", help="Timed batch-1 runs per model (median)."),
    json_path: Optional[str] = json_option("the results"),
    store: Optional[Path] = StoreOpt,
) -> None:
    """Full vs fused accuracy, accuracy with each part missing, params, FLOPs, predicted and measured latency."""
    from edgemesh.bench.vit import place, report
    from edgemesh.placement.vit import VitPlacement
    from edgemesh.vit.datasets import load_dataset
    from edgemesh.vit.store import load_model, load_split, resolve

    d = resolve(split_dir, store, "split")
    s = load_split(d)
    full = None
    src = model or str(s.meta.get("source_model", ""))
    if src:
        full, _ = load_model(resolve(src, store, "model"))
    dataset = str(s.meta.get("dataset", ""))
    data = load_dataset(dataset)
    with Console(stderr=True).status("evaluating…"):
        rep = report(s, full, data.test_x, data.test_y, dataset=dataset, repeats=repeats)
    placement: VitPlacement | None = place(s, read_devices(devices)) if devices else None
    pj = s.meta.get("placement") if placement is None else placement.to_json()
    predicted = {a["part"]: (a["device"], a["finish_ms"] - a["start_ms"]) for a in (pj or {}).get("assignments", [])}

    t = Table(title=f"{d.name}: {dataset}, {rep.test_samples:,} test images")
    for col in ("", "accuracy", "params", "FLOPs/image", "device", "predicted ms", "measured ms (this CPU, 1 thread)"):
        t.add_column(col)
    t.add_row("full model", _pct(rep.full_acc) if full is not None else "-", f"{rep.params_full:,}",
              f"{rep.flops_full:,}", "-", "-", f"{rep.latency.full_ms:.3f}" if full is not None else "-")
    t.add_row("fused (all parts)", _pct(rep.fused_acc), f"{sum(rep.params_parts.values()):,} total",
              f"{sum(rep.flops_parts.values()):,} total", "-", "-", f"{rep.latency.split_ms:.3f} (slowest part + fusion)")
    for p in s.parts:
        dev, ms = predicted.get(p.name, ("-", None))
        t.add_row(f"{p.name} ({', '.join(rep.classes[p.name])})", f"without it: {_pct(rep.one_missing.get(p.name, rep.fused_acc))}",
                  f"{p.params:,} ({p.params / rep.params_full:.3f})", f"{p.flops:,}", dev,
                  f"{ms:.4f}" if ms is not None else "-", f"{rep.latency.parts_ms[p.name]:.3f}")
    t.add_row("fusion MLP", "", f"{sum(x.numel() for x in s.fusion.parameters()):,}", "-", "-", "-",
              f"{rep.latency.fusion_ms:.3f}")
    table_console(json_path).print(t)
    result = rep.to_json()
    if pj:
        result["placement"] = pj
    write_json(json_path, result, note=Console(stderr=True).print)
