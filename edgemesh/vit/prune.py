"""Structured pruning: remove attention heads, MLP neurons and embedding channels.

Importance is first-order Taylor per structure, measured on the data the pruned model will
serve: removing a group G of weights changes the loss by about Σ_{w∈G} w·∂L/∂w, so a group's
score is the square of that sum, accumulated over batches (Molchanov et al., 2019). The result
is a new ``ViT`` whose weight matrices are slices of the original: fewer parameters and FLOPs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgemesh.errors import ConfigError
from edgemesh.vit.model import ViT, ViTConfig, count_params
from edgemesh.vit.train import normalize


@dataclass
class Importance:
    channels: torch.Tensor  # (dim,)
    heads: list[torch.Tensor]  # per block, (heads,)
    mlp: list[torch.Tensor]  # per block, (mlp,)


@dataclass(frozen=True)
class Keep:
    """Indices to keep (sorted); ``classes`` are rows of the head to keep (None = all)."""

    channels: torch.Tensor
    heads: tuple[torch.Tensor, ...]
    mlp: tuple[torch.Tensor, ...]


def _wg(p: torch.nn.Parameter) -> torch.Tensor:
    return (p.detach() * p.grad) if p.grad is not None else torch.zeros_like(p)


def taylor_importance(model: ViT, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256, max_samples: int = 2048,
                      loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy) -> Importance:
    """Scores of every head, MLP neuron and channel on images ``x`` (raw pixels) with labels ``y``."""
    c = model.config
    imp = Importance(torch.zeros(c.dim), [torch.zeros(h) for h in c.heads], [torch.zeros(m) for m in c.mlp])
    x, y = x[:max_samples], y[:max_samples]
    xn = normalize(x, c)
    model.eval()  # no dropout anyway; keeps LayerNorm etc. deterministic
    for i in range(0, len(y), batch_size):
        model.zero_grad(set_to_none=True)
        loss_fn(model(xn[i:i + batch_size]), y[i:i + batch_size]).backward()
        ch = _wg(model.patch.weight).sum((1, 2, 3)) + _wg(model.patch.bias) + _wg(model.cls).sum((0, 1)) \
            + _wg(model.pos).sum((0, 1)) + _wg(model.norm.weight) + _wg(model.norm.bias) + _wg(model.head.weight).sum(0)
        for li, blk in enumerate(model.blocks):
            ch = ch + _wg(blk.norm1.weight) + _wg(blk.norm1.bias) + _wg(blk.norm2.weight) + _wg(blk.norm2.bias)
            if blk.attn is not None:
                h, hd = blk.attn.heads, blk.attn.head_dim
                qkv_w = _wg(blk.attn.qkv.weight)
                ch = ch + qkv_w.sum(0) + _wg(blk.attn.proj.weight).sum(1) + _wg(blk.attn.proj.bias)
                per_head = qkv_w.view(3, h, hd, -1).sum((0, 2, 3)) + _wg(blk.attn.qkv.bias).view(3, h, hd).sum((0, 2)) \
                    + _wg(blk.attn.proj.weight).view(-1, h, hd).sum((0, 2))
                imp.heads[li] += per_head.pow(2)
            if blk.fc1 is not None and blk.fc2 is not None:
                fc1_w, fc2_w = _wg(blk.fc1.weight), _wg(blk.fc2.weight)
                ch = ch + fc1_w.sum(0) + fc2_w.sum(1) + _wg(blk.fc2.bias)
                imp.mlp[li] += (fc1_w.sum(1) + _wg(blk.fc1.bias) + fc2_w.sum(0)).pow(2)
        imp.channels += ch.pow(2)
    model.zero_grad(set_to_none=True)
    return imp


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    k = max(0, min(k, len(scores)))
    return torch.topk(scores, k).indices.sort().values if k else torch.zeros(0, dtype=torch.long)


def shrunk_config(config: ViTConfig, ratio: float, num_classes: int) -> ViTConfig:
    """The config with every width scaled by ``ratio`` (at least one channel/head per block)."""
    return config.with_(
        dim=max(1, round(config.dim * ratio)),
        heads=tuple(max(1, round(h * ratio)) if h else 0 for h in config.heads),
        mlp=tuple(max(1, round(m * ratio)) if m else 0 for m in config.mlp),
        num_classes=num_classes,
    )


def fit_ratio(config: ViTConfig, max_params: int, num_classes: int) -> ViTConfig:
    """The widest uniformly shrunk config with at most ``max_params`` parameters."""
    for step in range(1000, 0, -5):
        cand = shrunk_config(config, step / 1000, num_classes)
        if count_params(cand) <= max_params:
            return cand
    raise ConfigError(f"cannot prune the model to {max_params:,} parameters (the smallest shape has "
                      f"{count_params(shrunk_config(config, 0.005, num_classes)):,}); use fewer parts or a larger model")


def select(imp: Importance, target: ViTConfig) -> Keep:
    """The most important structures, as many as ``target`` has."""
    return Keep(_top(imp.channels, target.dim), tuple(_top(s, h) for s, h in zip(imp.heads, target.heads)),
                tuple(_top(s, m) for s, m in zip(imp.mlp, target.mlp)))


@torch.no_grad()
def prune(model: ViT, keep: Keep, *, head_weight: torch.Tensor | None = None,
          head_bias: torch.Tensor | None = None, labels: tuple[str, ...] | None = None) -> ViT:
    """A new, smaller ViT holding the kept slices of ``model``'s weights.

    ``head_weight``/``head_bias`` (rows over the *original* channels) replace the classifier,
    e.g. for a sub-model that predicts a class subset plus "other"."""
    c = model.config
    ch = keep.channels
    hw = model.head.weight if head_weight is None else head_weight
    hb = model.head.bias if head_bias is None else head_bias
    new_c = c.with_(dim=len(ch), heads=tuple(len(h) for h in keep.heads), mlp=tuple(len(m) for m in keep.mlp),
                    num_classes=hw.shape[0], labels=labels if labels is not None else c.labels)
    new = ViT(new_c)
    new.patch.weight.copy_(model.patch.weight[ch])
    new.patch.bias.copy_(model.patch.bias[ch])
    new.cls.copy_(model.cls[..., ch])
    new.pos.copy_(model.pos[..., ch])
    for src, dst, hk, mk in zip(model.blocks, new.blocks, keep.heads, keep.mlp):
        for n in ("norm1", "norm2"):
            getattr(dst, n).weight.copy_(getattr(src, n).weight[ch])
            getattr(dst, n).bias.copy_(getattr(src, n).bias[ch])
        if dst.attn is not None and src.attn is not None:
            hd = c.head_dim
            rows = (torch.arange(3).view(3, 1, 1) * src.attn.heads * hd + hk.view(1, -1, 1) * hd
                    + torch.arange(hd).view(1, 1, hd)).reshape(-1)
            cols = (hk.view(-1, 1) * hd + torch.arange(hd).view(1, hd)).reshape(-1)
            dst.attn.qkv.weight.copy_(src.attn.qkv.weight[rows][:, ch])
            dst.attn.qkv.bias.copy_(src.attn.qkv.bias[rows])
            dst.attn.proj.weight.copy_(src.attn.proj.weight[ch][:, cols])
            dst.attn.proj.bias.copy_(src.attn.proj.bias[ch])
        if dst.fc1 is not None and src.fc1 is not None and dst.fc2 is not None and src.fc2 is not None:
            dst.fc1.weight.copy_(src.fc1.weight[mk][:, ch])
            dst.fc1.bias.copy_(src.fc1.bias[mk])
            dst.fc2.weight.copy_(src.fc2.weight[ch][:, mk])
            dst.fc2.bias.copy_(src.fc2.bias[ch])
    new.norm.weight.copy_(model.norm.weight[ch])
    new.norm.bias.copy_(model.norm.bias[ch])
    new.head.weight.copy_(hw[:, ch])
    new.head.bias.copy_(hb)
    new.eval()
    return new
