"""`edgemesh bench vit` and `edgemesh vit eval`: accuracy, size and latency of a split vs the full ViT.

Latency is measured in-process on this machine with one torch thread (a small device's view):
batch-1 forward passes, median of many. The split's latency assumes the parts run in parallel
on their own devices: the slowest part plus the fusion (network time not included).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from edgemesh.placement.devices import Device
from edgemesh.placement.vit import PartDemand, VitPlacement, place_parts, part_memory
from edgemesh.vit.datasets import Dataset
from edgemesh.vit.model import ViT, count_flops, count_ops, count_params
from edgemesh.vit.split import Split, build_split, evaluate_split, run_part
from edgemesh.vit.train import Progress, torch_threads


@torch.inference_mode()
def median_ms(fn: Callable[[], object], *, repeats: int = 50, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@dataclass
class Latency:
    full_ms: float
    parts_ms: dict[str, float]
    fusion_ms: float

    @property
    def split_ms(self) -> float:
        return max(self.parts_ms.values()) + self.fusion_ms


def measure_latency(split: Split, full: ViT | None, *, repeats: int = 50) -> Latency:
    """Batch-1 latency of the full model, of each part and of the fusion (one thread)."""
    c = split.parts[0].model.config
    x = torch.randn(1, c.in_chans, c.image_size, c.image_size)
    with torch_threads(1):
        full_ms = median_ms(lambda: full(x), repeats=repeats) if full is not None else float("nan")
        parts_ms = {p.name: median_ms(lambda p=p: run_part(p, x), repeats=repeats) for p in split.parts}
        packed = [run_part(p, x).packed() for p in split.parts]
        fusion_ms = median_ms(lambda: split.fusion(packed), repeats=repeats)
    return Latency(full_ms, parts_ms, fusion_ms)


def demands(split: Split) -> list[PartDemand]:
    out = []
    for p in split.parts:
        c = p.model.config
        widest = max([h * c.head_dim * 3 for h in c.heads] + list(c.mlp) + [c.dim])
        out.append(PartDemand(p.name, p.flops, part_memory(p.params, c.tokens, c.dim, widest), count_ops(c)))
    return out


def place(split: Split, devices: list[Device]) -> VitPlacement:
    return place_parts(demands(split), devices)


@dataclass
class SplitReport:
    dataset: str
    parts: int
    full_acc: float
    fused_acc: float
    fused_acc_one_missing: float
    one_missing: dict[str, float]
    part_acc: dict[str, float]
    params_full: int
    params_parts: dict[str, int]
    flops_full: int
    flops_parts: dict[str, int]
    classes: dict[str, list[str]]
    latency: Latency
    test_samples: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def params_max_part(self) -> int:
        return max(self.params_parts.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset, "parts": self.parts,
            "full_acc": round(self.full_acc, 5), "fused_acc": round(self.fused_acc, 5),
            "fused_acc_one_missing": round(self.fused_acc_one_missing, 5),
            "fused_acc_without": {k: round(v, 5) for k, v in self.one_missing.items()},
            "part_subset_acc": {k: round(v, 5) for k, v in self.part_acc.items()},
            "params_full": self.params_full, "params_max_part": self.params_max_part,
            "params_parts": self.params_parts, "size_reduction": round(self.params_full / self.params_max_part, 3),
            "flops_full": self.flops_full, "flops_parts": self.flops_parts, "classes": self.classes,
            "latency_full_ms": round(self.latency.full_ms, 4), "latency_split_ms": round(self.latency.split_ms, 4),
            "latency_parts_ms": {k: round(v, 4) for k, v in self.latency.parts_ms.items()},
            "latency_fusion_ms": round(self.latency.fusion_ms, 4), "test_samples": self.test_samples,
            **self.extra,
        }


def report(split: Split, full: ViT | None, x: torch.Tensor, y: torch.Tensor, *, dataset: str,
           repeats: int = 50) -> SplitReport:
    with torch_threads(1):
        ev = evaluate_split(split, full, x, y)
    lat = measure_latency(split, full, repeats=repeats)
    params_full = count_params(full.config) if full is not None else int(split.meta.get("full_params", 0))
    flops_full = count_flops(full.config) if full is not None else int(split.meta.get("full_flops", 0))
    labels = split.labels
    return SplitReport(
        dataset=dataset, parts=len(split.parts), full_acc=ev.full_acc, fused_acc=ev.fused_acc,
        fused_acc_one_missing=ev.fused_acc_one_missing, one_missing=ev.one_missing, part_acc=ev.part_acc,
        params_full=params_full, params_parts={p.name: p.params for p in split.parts}, flops_full=flops_full,
        flops_parts={p.name: p.flops for p in split.parts},
        classes={p.name: [labels[c] if c < len(labels) else str(c) for c in p.classes] for p in split.parts},
        latency=lat, test_samples=len(y))


def run_bench(data: Dataset, full: ViT, parts: int, split_cfg: Any, *, progress: Progress | None = None,
              repeats: int = 50) -> tuple[Split, SplitReport]:
    t0 = time.perf_counter()
    with torch_threads(1):
        split = build_split(full, data, parts, split_cfg, progress=progress)
    seconds = time.perf_counter() - t0
    rep = report(split, full, data.test_x, data.test_y, dataset=data.name, repeats=repeats)
    rep.extra["seconds_split"] = round(seconds, 1)
    return split, rep
