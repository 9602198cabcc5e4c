"""ED-ViT split: class-subset sub-models pruned from one ViT, fused by a small MLP (ALGORITHMS §4).

The pieces a distributed runtime needs are deliberately small and independent:

- ``run_part(part, images)`` → ``PartOutput`` (feature vector + subset logits) — what one
  device computes for a batch;
- ``fuse(fusion, outputs)`` → ``Fused`` (class probabilities + names of the parts that did not
  answer) — what the master computes from whichever parts replied.

Building a split (``build_split``): partition the classes, prune a copy of the full model per
subset by Taylor importance measured on that subset's images to at most 1/N of the full
model's parameters, fine-tune it on "S_k vs other" with distillation from the full model, then
train the fusion MLP on the concatenated part outputs with whole-part dropout so it still
answers, less accurately, when parts are missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgemesh.errors import ConfigError
from edgemesh.vit.datasets import Dataset
from edgemesh.vit.model import ViT, count_flops, count_params
from edgemesh.vit.prune import fit_ratio, prune, select, taylor_importance
from edgemesh.vit.train import Progress, TrainConfig, accuracy, fit, normalize, predict_both

OTHER = "other"


def partition_classes(num_classes: int, parts: int, weights: list[float] | None = None,
                      order: list[int] | None = None) -> list[tuple[int, ...]]:
    """Split classes 0..C-1 into ``parts`` non-empty subsets, sizes proportional to ``weights``
    (device capacity; equal when None). ``order`` lists the classes so that neighbours end up
    together (e.g. classes the full model confuses with each other); default 0..C-1."""
    if not 1 <= parts <= num_classes:
        raise ConfigError(f"cannot split {num_classes} classes into {parts} parts (need 1 ≤ parts ≤ {num_classes})")
    w = list(weights) if weights is not None else [1.0] * parts
    if len(w) != parts or any(x <= 0 for x in w):
        raise ConfigError(f"need {parts} positive capacity weights, got {w}")
    # one class each, then the rest by largest remainder
    spare = num_classes - parts
    exact = [spare * x / sum(w) for x in w]
    sizes = [1 + int(e) for e in exact]
    for i in sorted(range(parts), key=lambda i: exact[i] - int(exact[i]), reverse=True)[:num_classes - sum(sizes)]:
        sizes[i] += 1
    seq = list(order) if order is not None else list(range(num_classes))
    if sorted(seq) != list(range(num_classes)):
        raise ConfigError("class order must list every class once")
    out, i = [], 0
    for s in sizes:
        out.append(tuple(sorted(seq[i:i + s])))
        i += s
    return out


def confusion_order(logits: torch.Tensor, y: torch.Tensor) -> list[int]:
    """Classes in an order where each is followed by the class it is most confused with (a
    greedy chain over the symmetric confusion matrix): contiguous subsets then keep confusable
    classes in one sub-model, which sees them side by side during fine-tuning."""
    c = logits.shape[1]
    probs = logits.softmax(-1)
    conf = torch.zeros(c, c)
    conf.index_add_(0, y, probs)
    conf = conf + conf.T
    conf.fill_diagonal_(-1)
    order = [int(torch.argmax(conf.sum(1)))]
    while len(order) < c:
        row = conf[order[-1]].clone()
        row[order] = -2
        order.append(int(torch.argmax(row)))
    return order


@dataclass
class Part:
    name: str
    classes: tuple[int, ...]  # classes of the full model this part tells apart (plus "other")
    model: ViT

    @property
    def params(self) -> int:
        return count_params(self.model.config)

    @property
    def flops(self) -> int:
        return count_flops(self.model.config)

    @property
    def out_dim(self) -> int:
        return self.model.config.dim + self.model.config.num_classes


@dataclass
class PartOutput:
    features: torch.Tensor  # (B, dim_k)
    logits: torch.Tensor  # (B, |S_k| + 1); the last column is "other"

    def packed(self) -> torch.Tensor:
        """The fusion MLP's input from this part (features, then clipped log-probabilities)."""
        return torch.cat([self.features, self.logits.log_softmax(-1).clamp(min=-12.0)], dim=-1)


@torch.inference_mode()
def run_part(part: Part, inputs: torch.Tensor) -> PartOutput:
    """One sub-model on a batch of model inputs (B, C, H, W): normalised pixels, as
    ``edgemesh.vit.images`` decodes them (or ``normalize(raw, config)``)."""
    part.model.eval()
    f, z = part.model.forward_both(inputs)
    return PartOutput(f, z)


@dataclass(frozen=True)
class FusionConfig:
    parts: tuple[str, ...]
    in_dims: tuple[int, ...]
    num_classes: int
    hidden: int

    def to_json(self) -> dict[str, Any]:
        return {"parts": list(self.parts), "in_dims": list(self.in_dims), "num_classes": self.num_classes,
                "hidden": self.hidden}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FusionConfig:
        try:
            return cls(tuple(str(p) for p in d["parts"]), tuple(int(x) for x in d["in_dims"]), int(d["num_classes"]),
                       int(d["hidden"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"unusable fusion config ({exc!r})") from None


class Fusion(nn.Module):
    """MLP over the concatenated part outputs plus a presence bit per part (a missing part's
    slot is zeros and its bit 0, so the MLP knows the zeros mean "absent")."""

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        self.config = config
        n_in = sum(config.in_dims) + len(config.parts)
        self.net = nn.Sequential(nn.Linear(n_in, config.hidden), nn.GELU(), nn.Linear(config.hidden, config.num_classes))

    def forward(self, packed: list[torch.Tensor | None], batch: int | None = None) -> torch.Tensor:
        if all(p is None for p in packed):
            raise ConfigError("no part answered: cannot classify")
        b = batch if batch is not None else next(p.shape[0] for p in packed if p is not None)
        cols, mask = [], []
        for p, d in zip(packed, self.config.in_dims):
            cols.append(p if p is not None else torch.zeros(b, d))
            mask.append(torch.full((b, 1), 1.0 if p is not None else 0.0))
        return self.net(torch.cat(cols + mask, dim=-1))


@dataclass
class Fused:
    probs: torch.Tensor  # (B, C)
    missing: list[str]  # parts that did not answer

    @property
    def predictions(self) -> torch.Tensor:
        return self.probs.argmax(-1)


@torch.inference_mode()
def fuse(fusion: Fusion, outputs: dict[str, PartOutput]) -> Fused:
    """Class probabilities from whichever parts answered (``outputs`` keyed by part name)."""
    unknown = set(outputs) - set(fusion.config.parts)
    if unknown:
        raise ConfigError(f"outputs from unknown parts {sorted(unknown)}; this split has {list(fusion.config.parts)}")
    fusion.eval()
    packed = [outputs[n].packed() if n in outputs else None for n in fusion.config.parts]
    return Fused(fusion(packed).softmax(-1), [n for n in fusion.config.parts if n not in outputs])


@dataclass
class Split:
    parts: list[Part]
    fusion: Fusion
    labels: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)  # dataset, full model's params/FLOPs/hash, accuracy…

    def classify(self, inputs: torch.Tensor, present: list[str] | None = None) -> Fused:
        """In-process reference on model inputs: every (or every ``present``) part, then the fusion."""
        outs = {p.name: run_part(p, inputs) for p in self.parts if present is None or p.name in present}
        return fuse(self.fusion, outs)


@dataclass(frozen=True)
class SplitConfig:
    finetune: TrainConfig = TrainConfig(epochs=3, lr=1.5e-3)
    fusion: TrainConfig = TrainConfig(epochs=15, batch_size=256, lr=2e-3, weight_decay=0.01)
    fusion_hidden: int = 128
    temperature: float = 2.0
    distill_subset: float = 1.0  # weight of matching the full model's probabilities over S_k + other
    distill_all: float = 1.0  # weight of an auxiliary head that matches all C of the full model's classes
    drop_prob: float = 0.5  # fraction of fusion training samples with one whole part zeroed
    importance_samples: int = 2048
    group_confusable: bool = True


def _subset_targets(y: torch.Tensor, classes: tuple[int, ...], num_classes: int) -> torch.Tensor:
    lut = torch.full((num_classes,), len(classes), dtype=torch.long)
    lut[list(classes)] = torch.arange(len(classes))
    return lut[y]


def _subset_probs(p: torch.Tensor, classes: tuple[int, ...]) -> torch.Tensor:
    others = [c for c in range(p.shape[1]) if c not in classes]
    return torch.cat([p[:, list(classes)], p[:, others].sum(1, keepdim=True)], dim=1)


def make_part(full: ViT, data: Dataset, classes: tuple[int, ...], name: str, max_params: int,
              cfg: SplitConfig) -> Part:
    """Prune ``full`` for ``classes`` (importance on their training images) to ≤ ``max_params``."""
    c = full.config
    sel = torch.isin(data.train_y, torch.tensor(classes))
    imp = taylor_importance(full, data.train_x[sel], data.train_y[sel], max_samples=cfg.importance_samples)
    target = fit_ratio(c, max_params, len(classes) + 1)
    keep = select(imp, target)
    others = [k for k in range(c.num_classes) if k not in classes]
    with torch.no_grad():
        hw = torch.cat([full.head.weight[list(classes)], full.head.weight[others].mean(0, keepdim=True)])
        hb = torch.cat([full.head.bias[list(classes)],
                        full.head.bias[others].logsumexp(0, keepdim=True)])
    labels = tuple(c.labels[k] if k < len(c.labels) else str(k) for k in classes) + (OTHER,)
    return Part(name, tuple(classes), prune(full, keep, head_weight=hw, head_bias=hb, labels=labels))


def finetune_part(part: Part, data: Dataset, teacher_logits: torch.Tensor, cfg: SplitConfig, *,
                  progress: Progress | None = None) -> None:
    """Train ``part`` on S_k vs other, distilled from the full model's logits on the same images."""
    model = part.model
    num_classes = teacher_logits.shape[1]
    xn = normalize(data.train_x, model.config)
    yk = _subset_targets(data.train_y, part.classes, num_classes)
    t = cfg.temperature
    p_all = (teacher_logits / t).softmax(-1)
    q_sub = _subset_probs(p_all, part.classes)
    # The auxiliary head makes the part's features carry something about every class, which the
    # fusion uses when another part is missing; it is dropped after fine-tuning.
    torch.manual_seed(cfg.finetune.seed)  # before the aux head's init: same seed, same part
    aux = nn.Linear(model.config.dim, num_classes)

    def step_loss(idx: torch.Tensor) -> torch.Tensor:
        f, z = model.forward_both(xn[idx])
        loss = F.cross_entropy(z, yk[idx])
        if cfg.distill_subset:
            loss = loss + cfg.distill_subset * t * t * F.kl_div((z / t).log_softmax(-1), q_sub[idx], reduction="batchmean")
        if cfg.distill_all:
            loss = loss + cfg.distill_all * t * t * F.kl_div((aux(f) / t).log_softmax(-1), p_all[idx],
                                                              reduction="batchmean")
        return loss

    fit(model, len(yk), step_loss, cfg.finetune, params=list(model.parameters()) + list(aux.parameters()),
        progress=progress, desc=f"fine-tune {part.name}")


def part_outputs(parts: list[Part], x: torch.Tensor) -> list[torch.Tensor]:
    """Every part's packed output on ``x`` (the fusion's training/evaluation input)."""
    outs = []
    for p in parts:
        f, z = predict_both(p.model, x)
        outs.append(PartOutput(f, z).packed())
    return outs


def train_fusion(parts: list[Part], packed: list[torch.Tensor], y: torch.Tensor, num_classes: int,
                 cfg: SplitConfig, *, progress: Progress | None = None) -> Fusion:
    torch.manual_seed(cfg.fusion.seed)
    fusion = Fusion(FusionConfig(tuple(p.name for p in parts), tuple(p.out_dim for p in parts), num_classes,
                                 cfg.fusion_hidden))
    n_parts = len(parts)
    gen = torch.Generator().manual_seed(cfg.fusion.seed + 1)

    def step_loss(idx: torch.Tensor) -> torch.Tensor:
        b = len(idx)
        keep = torch.ones(b, n_parts)
        if n_parts > 1 and cfg.drop_prob > 0:
            drop = torch.rand(b, generator=gen) < cfg.drop_prob
            which = torch.randint(0, n_parts, (b,), generator=gen)
            keep[drop, which[drop]] = 0.0
        cols = [packed[k][idx] * keep[:, k:k + 1] for k in range(n_parts)]
        x = torch.cat(cols + [keep], dim=-1)
        return F.cross_entropy(fusion.net(x), y[idx])

    fit(fusion, len(y), step_loss, cfg.fusion, progress=progress, desc="fusion")
    return fusion


@torch.inference_mode()
def fused_accuracy(fusion: Fusion, packed: list[torch.Tensor], y: torch.Tensor, missing: int | None = None) -> float:
    """Accuracy of the fusion on precomputed part outputs, with part ``missing`` absent."""
    fusion.eval()
    ins = [None if k == missing else p for k, p in enumerate(packed)]
    return accuracy(fusion(ins, batch=len(y)), y)


def build_split(full: ViT, data: Dataset, parts: int, cfg: SplitConfig = SplitConfig(), *,
                weights: list[float] | None = None, progress: Progress | None = None) -> Split:
    c = full.config
    full.eval()
    _, teacher_logits = predict_both(full, data.train_x)
    order = confusion_order(teacher_logits, data.train_y) if cfg.group_confusable else None
    subsets = partition_classes(c.num_classes, parts, weights, order)
    full_params = count_params(c)
    max_params = full_params // parts
    built: list[Part] = []
    for k, classes in enumerate(subsets):
        part = make_part(full, data, classes, f"part{k}", max_params, cfg)
        finetune_part(part, data, teacher_logits, cfg, progress=progress)
        built.append(part)
    packed = part_outputs(built, data.train_x)
    fusion = train_fusion(built, packed, data.train_y, c.num_classes, cfg, progress=progress)
    meta = {"dataset": data.name, "full_params": full_params, "full_flops": count_flops(c),
            "max_params_per_part": max_params, "class_order": order}
    return Split(built, fusion, c.labels, meta)


@dataclass
class SplitEval:
    full_acc: float
    fused_acc: float
    one_missing: dict[str, float]  # part name → fused accuracy without it
    part_acc: dict[str, float]  # each part's own S_k-vs-other accuracy

    @property
    def fused_acc_one_missing(self) -> float:
        """Mean over which part is missing."""
        return sum(self.one_missing.values()) / len(self.one_missing) if self.one_missing else self.fused_acc


def evaluate_split(split: Split, full: ViT | None, x: torch.Tensor, y: torch.Tensor) -> SplitEval:
    from edgemesh.vit.train import evaluate

    full_acc = evaluate(full, x, y) if full is not None else float("nan")
    num_classes = split.fusion.config.num_classes
    packed, part_acc = [], {}
    for p in split.parts:
        f, z = predict_both(p.model, x)
        packed.append(PartOutput(f, z).packed())
        part_acc[p.name] = accuracy(z, _subset_targets(y, p.classes, num_classes))
    fused = fused_accuracy(split.fusion, packed, y)
    missing = {p.name: fused_accuracy(split.fusion, packed, y, k) for k, p in enumerate(split.parts)} \
        if len(split.parts) > 1 else {}
    return SplitEval(full_acc, fused, missing, part_acc)
