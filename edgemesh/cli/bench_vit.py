"""CLI: `edgemesh bench vit` — a ViT split into N class-subset parts vs the full model."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from edgemesh.cli.bench import bench_app
from edgemesh.cli.output import json_option, table_console, write_json


@bench_app.command("vit")
def bench_vit(
    dataset: str = typer.Option("mnist", "--dataset", help="mnist, fashion-mnist or digits."),
    parts: list[int] = typer.Option([2], "--parts", help="Number of parts N; repeat for several (one full model)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training and fine-tuning epochs (default: recipe)."),
    seed: int = typer.Option(0, "--seed"),
    limit: int = typer.Option(0, "--limit", help="Use only the first N training images (0 = all)."),
    model: str = typer.Option("", "--model", help="Use this trained model (store name or directory) instead of training one."),
    save_model: Optional[Path] = typer.Option(None, "--save-model", help="Also save the trained full model here (reuse it with --model)."),
    repeats: int = typer.Option(50, "--repeats", help="Timed batch-1 runs per model (median)."),
    json_path: Optional[str] = json_option("the results"),
) -> None:
    """Full vs fused accuracy, size reduction, batch-1 latency (parts in parallel), accuracy with a part missing."""
    from edgemesh.bench.vit import run_bench
    from edgemesh.cli.vit import progress_bar
    from edgemesh.vit.datasets import load_dataset
    from edgemesh.vit.recipes import recipe_for, train_model
    from edgemesh.vit.store import load_model, resolve, save_model as save
    from edgemesh.vit.train import evaluate, torch_threads

    data = load_dataset(dataset).limited(train=limit)
    recipe = recipe_for(dataset).with_epochs(epochs, seed)
    t0 = time.perf_counter()
    if model:
        full, _ = load_model(resolve(model, None, "model"))
    else:
        with torch_threads(1), progress_bar("full ViT") as bar:
            full = train_model(data, recipe, progress=bar)
    train_s = time.perf_counter() - t0
    if save_model and not model:
        save(save_model, full, {"dataset": dataset, "accuracy": evaluate(full, data.test_x, data.test_y),
                                "epochs": recipe.train.epochs, "seed": seed, "train_samples": len(data.train_y)})
    runs: list[dict[str, Any]] = []
    for n in parts:
        with progress_bar(f"N={n}") as bar:
            _, rep = run_bench(data, full, n, recipe.split, progress=bar, repeats=repeats)
        r = rep.to_json()
        r.update({"epochs": recipe.train.epochs, "finetune_epochs": recipe.split.finetune.epochs, "seed": seed,
                  "train_samples": len(data.train_y), "seconds_train_full": round(train_s, 1), "torch_threads": 1})
        runs.append(r)
        if json_path is not None and str(json_path) != "-":  # after every N: a stopped run keeps what it measured
            Path(json_path).write_text(json.dumps(runs[0] if len(runs) == 1 else {"dataset": dataset, "runs": runs}, indent=1))
    t = Table(title=f"ViT split on {dataset} ({len(data.train_y):,} train / {len(data.test_y):,} test images; "
                    "latency batch 1, 1 thread, this CPU)")
    for col in ("N", "full acc", "fused acc", "Δ (pts)", "one part missing", "params full", "largest part",
                "size ×", "latency full ms", "split ms (max part + fusion)"):
        t.add_column(col)
    for r in runs:
        t.add_row(str(r["parts"]), f"{100 * r['full_acc']:.2f}", f"{100 * r['fused_acc']:.2f}",
                  f"{100 * (r['fused_acc'] - r['full_acc']):+.2f}", f"{100 * r['fused_acc_one_missing']:.2f}",
                  f"{r['params_full']:,}", f"{r['params_max_part']:,}", f"{r['size_reduction']:.2f}",
                  f"{r['latency_full_ms']:.3f}", f"{r['latency_split_ms']:.3f}")
    table_console(json_path).print(t)
    out: dict[str, Any] = runs[0] if len(runs) == 1 else {"dataset": dataset, "runs": runs}
    write_json(json_path, out, note=Console(stderr=True).print)
