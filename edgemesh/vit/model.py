"""A small vision transformer in plain torch, shaped so that structured pruning can shrink it.

Every block may have its own number of attention heads and MLP neurons (pruning removes them
per block); the head width (``head_dim``) is fixed. ``dim`` is the width of the residual stream
(the embedding channels), shared by all blocks. A pruned model is an ordinary ``ViT`` with a
smaller config: no masks, fewer parameters and FLOPs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgemesh.errors import ConfigError


@dataclass(frozen=True)
class ViTConfig:
    image_size: int  # square images, image_size × image_size pixels
    patch_size: int
    in_chans: int
    num_classes: int
    dim: int  # residual stream width (embedding channels)
    head_dim: int
    heads: tuple[int, ...]  # attention heads per block (0 = the block has no attention)
    mlp: tuple[int, ...]  # MLP hidden neurons per block (0 = no MLP)
    # input normalisation, applied by the image helpers before the model
    mean: float = 0.0
    std: float = 1.0
    labels: tuple[str, ...] = field(default_factory=tuple)  # one name per output class

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"image size {self.image_size} is not a multiple of patch size {self.patch_size}")
        if len(self.heads) != len(self.mlp):
            raise ConfigError(f"heads ({len(self.heads)} blocks) and mlp ({len(self.mlp)} blocks) differ in depth")
        if self.dim < 1 or self.head_dim < 1 or self.num_classes < 1:
            raise ConfigError("dim, head_dim and num_classes must be >= 1")

    @classmethod
    def uniform(cls, *, image_size: int, patch_size: int, in_chans: int, num_classes: int, dim: int,
                depth: int, heads: int, mlp_ratio: float = 2.0, mean: float = 0.0, std: float = 1.0,
                labels: tuple[str, ...] = ()) -> ViTConfig:
        if dim % heads:
            raise ConfigError(f"dim {dim} is not divisible by {heads} heads")
        return cls(image_size, patch_size, in_chans, num_classes, dim, dim // heads, (heads,) * depth,
                   (int(dim * mlp_ratio),) * depth, mean, std, tuple(labels))

    @property
    def depth(self) -> int:
        return len(self.heads)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens(self) -> int:
        return self.num_patches + 1

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["heads"], d["mlp"], d["labels"] = list(self.heads), list(self.mlp), list(self.labels)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ViTConfig:
        try:
            return cls(int(d["image_size"]), int(d["patch_size"]), int(d["in_chans"]), int(d["num_classes"]),
                       int(d["dim"]), int(d["head_dim"]), tuple(int(h) for h in d["heads"]),
                       tuple(int(m) for m in d["mlp"]), float(d.get("mean", 0.0)), float(d.get("std", 1.0)),
                       tuple(str(x) for x in d.get("labels", ())))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"unusable ViT config ({exc!r})") from None

    def with_(self, **kw: Any) -> ViTConfig:
        return replace(self, **kw)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class Block(nn.Module):
    """Pre-norm encoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, head_dim) if heads else None
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp) if mlp else None
        self.fc2 = nn.Linear(mlp, dim) if mlp else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn is not None:
            x = x + self.attn(self.norm1(x))
        if self.fc1 is not None and self.fc2 is not None:
            x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return x


class ViT(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.patch = nn.Conv2d(c.in_chans, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.pos = nn.Parameter(torch.zeros(1, c.tokens, c.dim))
        self.blocks = nn.ModuleList(Block(c.dim, h, c.head_dim, m) for h, m in zip(c.heads, c.mlp))
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.num_classes)
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.cls, std=0.02)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The class token after the final norm: the vector a sub-model sends to the fusion."""
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x[:, 0])

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return f, self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def count_params(config: ViTConfig) -> int:
    """Parameters of a model with this config (equals ``sum(p.numel())`` of the built model)."""
    c = config
    n = c.dim * c.in_chans * c.patch_size ** 2 + c.dim  # patch embedding
    n += c.dim + c.tokens * c.dim  # class token, position embedding
    for h, m in zip(c.heads, c.mlp):
        n += 4 * c.dim  # two norms
        if h:
            inner = h * c.head_dim
            n += c.dim * 3 * inner + 3 * inner + inner * c.dim + c.dim
        if m:
            n += c.dim * m + m + m * c.dim + c.dim
    n += 2 * c.dim + c.dim * c.num_classes + c.num_classes
    return n


def count_flops(config: ViTConfig) -> int:
    """FLOPs of one image's forward pass (2 per multiply-add; matmuls and attention only)."""
    c = config
    t = c.tokens
    f = 2 * c.num_patches * c.in_chans * c.patch_size ** 2 * c.dim
    for h, m in zip(c.heads, c.mlp):
        inner = h * c.head_dim
        f += 2 * t * c.dim * 3 * inner  # qkv
        f += 2 * 2 * h * t * t * c.head_dim  # q·kᵀ and attn·v
        f += 2 * t * inner * c.dim  # proj
        f += 2 * 2 * t * c.dim * m  # fc1, fc2
    f += 2 * c.dim * c.num_classes
    return f


def count_ops(config: ViTConfig) -> int:
    """Tensor operations of one forward pass (each has a fixed cost however small the tensors)."""
    per_block = sum((7 if h else 0) + (5 if m else 0) for h, m in zip(config.heads, config.mlp))
    return 6 + per_block + 3
