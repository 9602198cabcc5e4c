"""Training and evaluation loops (AdamW, warm-up then cosine learning rate, seeded)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgemesh.vit.model import ViT, ViTConfig

# (description, steps done, steps total): the CLI turns it into a rich progress bar.
Progress = Callable[[str, int, int], None]


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch with ``n`` threads, then restore. Small ViTs train about twice as fast with one
    thread on a shared 2-core machine (two threads spin-wait on each other under load)."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def normalize(x: torch.Tensor, config: ViTConfig) -> torch.Tensor:
    """Pixels in [0, 1] → the model's input normalisation."""
    return (x - config.mean) / config.std


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: float = 0.05  # fraction of the steps with a linear warm-up
    seed: int = 0


def fit(model: nn.Module, n: int, step_loss: Callable[[torch.Tensor], torch.Tensor], cfg: TrainConfig, *,
        params: list[nn.Parameter] | None = None, progress: Progress | None = None, desc: str = "train") -> float:
    """Run ``cfg.epochs`` epochs over ``n`` samples; ``step_loss(indices)`` returns one batch's loss.

    Returns the mean loss of the last epoch."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(params if params is not None else list(model.parameters()), lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    total = cfg.epochs * steps_per_epoch
    warm = max(1, int(cfg.warmup * total))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    step, last = 0, 0.0
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        running = 0.0
        for b in range(steps_per_epoch):
            idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            loss = step_loss(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
            step += 1
            if progress:
                progress(f"{desc} epoch {epoch + 1}/{cfg.epochs} loss {running / (b + 1):.3f}", step, total)
        last = running / steps_per_epoch
    model.eval()
    return last


def train_classifier(model: ViT, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, *,
                     progress: Progress | None = None) -> float:
    """Plain cross-entropy training of a full model on raw [0, 1] images ``x``."""
    torch.manual_seed(cfg.seed)
    xn = normalize(x, model.config)

    def step_loss(idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(xn[idx]), y[idx], label_smoothing=0.05)

    return fit(model, len(y), step_loss, cfg, progress=progress, desc="train")


@torch.inference_mode()
def predict_logits(model: ViT, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    model.eval()
    xn = normalize(x, model.config)
    return torch.cat([model(xn[i:i + batch_size]) for i in range(0, len(xn), batch_size)])


@torch.inference_mode()
def predict_both(model: ViT, x: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and logits of every image (raw [0, 1] pixels in)."""
    model.eval()
    xn = normalize(x, model.config)
    outs = [model.forward_both(xn[i:i + batch_size]) for i in range(0, len(xn), batch_size)]
    return torch.cat([f for f, _ in outs]), torch.cat([z for _, z in outs])


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(-1) == y).float().mean()) if len(y) else 0.0


def evaluate(model: ViT, x: torch.Tensor, y: torch.Tensor) -> float:
    return accuracy(predict_logits(model, x), y)
