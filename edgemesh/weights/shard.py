"""What one participant holds of a decoder layer, and how to cut that slice out of a block.

Tensor names inside blocks (the store format; HF names are mapped at import time):

- ``input``:  ``embed`` [V, H]
- ``attn_i``: ``norm`` [H], ``wq`` [nq·d, H], ``wk``/``wv`` [nkv·d, H], ``wo`` [H, nq·d],
  optional ``bq``/``bk``/``bv`` (per head rows) and ``bo`` [H]
- ``mlp_i``:  ``norm`` [H], ``w_gate``/``w_up`` [F, H], ``w_down`` [H, F],
  optional ``b_gate``/``b_up`` [F] and ``b_down`` [H]
- ``output``: ``norm`` [H], ``lm_head`` [V, H] (absent when the embedding is tied)

An int8 model (``quant.py``) stores each weight matrix as int8 plus ``<name>.scale`` [out]:
a row slice takes its rows' scales, a column slice (``wo``, ``w_down``) keeps all of them.
A q4 model stores uint8 ``<name>`` [out, in/2] and ``<name>.scale`` [out, in/32, 2]: a row slice
takes its rows of both, a column slice takes whole 32-column groups of both (and refuses a cut
that is not on a group boundary).

The attention unit is a KV-head group (1 KV head + its g query heads); the MLP unit is a
contiguous range of the intermediate dimension. Output biases (``bo``, ``b_down``) are kept
only in the slice that ``adds_bias`` so the allreduce adds them exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from edgemesh.errors import ConfigError
from edgemesh.weights.config import ModelConfig


@dataclass(frozen=True)
class ShardSpec:
    """One participant's share of one decoder layer (either part may be empty)."""

    kv_groups: tuple[int, ...] = ()
    mlp_start: int = 0
    mlp_stop: int = 0
    adds_bias: bool = False  # exactly one participant per layer (rank 0 by convention)

    @property
    def mlp_size(self) -> int:
        return self.mlp_stop - self.mlp_start

    @classmethod
    def full(cls, config: ModelConfig) -> ShardSpec:
        return cls(tuple(range(config.num_key_value_heads)), 0, config.intermediate_size, True)

    def key(self) -> str:
        """A short stable name for slice files: which groups, which range, bias or not."""
        groups = "-".join(str(g) for g in self.kv_groups) or "none"
        return f"g{groups}_f{self.mlp_start}-{self.mlp_stop}{'_b' if self.adds_bias else ''}"

    def validate(self, config: ModelConfig) -> None:
        n = config.num_key_value_heads
        if any(g < 0 or g >= n for g in self.kv_groups) or len(set(self.kv_groups)) != len(self.kv_groups):
            raise ConfigError(f"shard spec: kv_groups {self.kv_groups} must be distinct values in 0..{n - 1}")
        if not 0 <= self.mlp_start <= self.mlp_stop <= config.intermediate_size:
            raise ConfigError(
                f"shard spec: MLP range {self.mlp_start}:{self.mlp_stop} outside 0:{config.intermediate_size}"
            )

    def to_json(self) -> dict[str, Any]:
        return {"kv_groups": list(self.kv_groups), "mlp_start": self.mlp_start,
                "mlp_stop": self.mlp_stop, "adds_bias": self.adds_bias}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShardSpec:
        return cls(tuple(int(g) for g in d["kv_groups"]), int(d["mlp_start"]), int(d["mlp_stop"]),
                   bool(d["adds_bias"]))


def check_layer_cover(config: ModelConfig, specs: list[ShardSpec]) -> None:
    """The participants' specs of one layer must partition its groups and MLP range exactly."""
    groups = sorted(g for s in specs for g in s.kv_groups)
    if groups != list(range(config.num_key_value_heads)):
        raise ConfigError(f"shard plan: KV groups {groups} do not cover 0..{config.num_key_value_heads - 1} exactly once")
    ranges = sorted((s.mlp_start, s.mlp_stop) for s in specs if s.mlp_size > 0)
    pos = 0
    for a, b in ranges:
        if a != pos:
            raise ConfigError(f"shard plan: MLP ranges {ranges} leave a gap or overlap at {pos}")
        pos = b
    if pos != config.intermediate_size:
        raise ConfigError(f"shard plan: MLP ranges end at {pos}, not {config.intermediate_size}")
    if sum(s.adds_bias for s in specs) != 1:
        raise ConfigError("shard plan: exactly one participant per layer must add the output bias")


def _head_rows(groups: tuple[int, ...], heads_per_group: int, head_dim: int) -> torch.Tensor:
    """Row indices of the heads of ``groups`` in a [heads·head_dim, …] projection."""
    idx = [
        r
        for g in groups
        for h in range(g * heads_per_group, (g + 1) * heads_per_group)
        for r in range(h * head_dim, (h + 1) * head_dim)
    ]
    return torch.tensor(idx, dtype=torch.long)


def _q4_columns(tensors: dict[str, torch.Tensor], name: str, cols: torch.Tensor) -> dict[str, torch.Tensor]:
    """Columns ``cols`` (whole groups of 32, in order) of the q4 matrix ``name`` and its scale."""
    from edgemesh.weights.quant import Q4_GROUP

    w, scale = tensors[name], tensors[name + ".scale"]
    k = 2 * w.shape[1]
    n = cols.numel()
    groups = cols[::Q4_GROUP] // Q4_GROUP if n else cols
    want = (groups[:, None] * Q4_GROUP + torch.arange(Q4_GROUP)[None, :]).reshape(-1) if n else cols
    if n % Q4_GROUP or not torch.equal(want, cols) or (n and int(cols.max()) >= k) or scale.shape != (
            w.shape[0], k // Q4_GROUP, 2):
        raise ConfigError(f"a q4 matrix {name!r} can only be cut into whole groups of {Q4_GROUP} columns: "
                          f"columns {cols[:1].tolist()}..{cols[-1:].tolist()} ({n}) of {k} do not fall on "
                          "group boundaries (the plan's MLP split must be a multiple of 32 for q4 models)")
    byte_cols = (groups[:, None] * (Q4_GROUP // 2) + torch.arange(Q4_GROUP // 2)[None, :]).reshape(-1)
    return {name: w.index_select(1, byte_cols).contiguous(),
            name + ".scale": scale.index_select(1, groups).contiguous()}


def _columns(tensors: dict[str, torch.Tensor], name: str, cols: torch.Tensor) -> dict[str, torch.Tensor]:
    """Columns ``cols`` of matrix ``name`` (a partial sum of tensor parallelism) with its scale:
    all of an int8 matrix's per-row scales, a q4 matrix's scales of the groups taken."""
    if tensors[name].dtype == torch.uint8:
        return _q4_columns(tensors, name, cols)
    out = {name: tensors[name].index_select(1, cols).contiguous()}
    if name + ".scale" in tensors:
        out[name + ".scale"] = tensors[name + ".scale"].clone()
    return out


def slice_block(config: ModelConfig, block: str, tensors: dict[str, torch.Tensor],
                spec: ShardSpec) -> dict[str, torch.Tensor]:
    """Cut one participant's slice out of a full ``attn_i``/``mlp_i`` block (contiguous copies)."""
    spec.validate(config)
    d, g = config.head_dim, config.group_size
    out: dict[str, torch.Tensor] = {"norm": tensors["norm"].clone()}
    if block.startswith("attn_"):
        q_rows = _head_rows(spec.kv_groups, g, d)
        kv_rows = _head_rows(spec.kv_groups, 1, d)
        out["wq"] = tensors["wq"].index_select(0, q_rows).contiguous()
        out["wk"] = tensors["wk"].index_select(0, kv_rows).contiguous()
        out["wv"] = tensors["wv"].index_select(0, kv_rows).contiguous()
        wo = _columns(tensors, "wo", q_rows)
        out["wo"] = wo["wo"]
        for name, rows in (("bq", q_rows), ("bk", kv_rows), ("bv", kv_rows),
                           ("wq.scale", q_rows), ("wk.scale", kv_rows), ("wv.scale", kv_rows)):
            if name in tensors:
                out[name] = tensors[name].index_select(0, rows).contiguous()
        if "bo" in tensors and spec.adds_bias:
            out["bo"] = tensors["bo"].clone()
        if "wo.scale" in wo:  # last, as before q4 (the order slice files were written in)
            out["wo.scale"] = wo["wo.scale"]
    elif block.startswith("mlp_"):
        a, b = spec.mlp_start, spec.mlp_stop
        out["w_gate"] = tensors["w_gate"][a:b].contiguous()
        out["w_up"] = tensors["w_up"][a:b].contiguous()
        down = _columns(tensors, "w_down", torch.arange(a, b))
        out["w_down"] = down["w_down"]
        for name in ("b_gate", "b_up", "w_gate.scale", "w_up.scale"):
            if name in tensors:
                out[name] = tensors[name][a:b].contiguous()
        if "b_down" in tensors and spec.adds_bias:
            out["b_down"] = tensors["b_down"].clone()
        if "w_down.scale" in down:
            out["w_down.scale"] = down["w_down.scale"]
    else:
        raise ConfigError(f"only decoder blocks (attn_i, mlp_i) are sliced, not {block!r}")
    return out


def split_layer(config: ModelConfig, groups: list[int], mlp: list[int]) -> list[ShardSpec]:
    """Contiguous specs for one layer from per-rank counts (KV groups, MLP rows); rank 0 adds biases."""
    if sum(groups) != config.num_key_value_heads or sum(mlp) != config.intermediate_size or len(groups) != len(mlp):
        raise ConfigError(
            f"split counts {groups} / {mlp} must sum to {config.num_key_value_heads} KV groups / "
            f"{config.intermediate_size} MLP rows, one entry per rank"
        )
    specs, g0, f0 = [], 0, 0
    for rank, (ng, nf) in enumerate(zip(groups, mlp)):
        specs.append(ShardSpec(tuple(range(g0, g0 + ng)), f0, f0 + nf, rank == 0))
        g0, f0 = g0 + ng, f0 + nf
    return specs


# ---- the head (and tied embedding) split by vocabulary rows -------------------------------


def vocab_range(config: ModelConfig, specs: list[ShardSpec], rank: int, world_size: int) -> tuple[int, int]:
    """This rank's rows ``[start, stop)`` of the LM head (vocabulary), from its MLP share.

    Every rank gets one row, and the other ``V - W`` rows are shared out by the same fraction
    as the MLP rows of layer 0 (``start_r = r + ⌊(V − W)·mlp_start_r / F⌋``). Because the plan
    gives MLP ranges contiguously in rank order (``split_layer``), the ranges of the ranks tile
    ``0..V`` in rank order, and each rank can work out its own without knowing the others'
    specs. The master checks the tiling on every distributed choice (``llm.choice``).
    """
    v, f = config.vocab_size, config.intermediate_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside a group of {world_size}")
    if world_size == 1:
        return 0, v
    if v < world_size:
        raise ConfigError(f"a vocabulary of {v} rows cannot give each of {world_size} ranks one row")
    if not specs:
        raise ConfigError("the vocabulary split needs the rank's shard specs")
    s = specs[0]
    spare = v - world_size
    return rank + spare * s.mlp_start // f, rank + 1 + spare * s.mlp_stop // f


def slice_head(config: ModelConfig, output: dict[str, torch.Tensor], embed: dict[str, torch.Tensor] | None,
               start: int, stop: int) -> dict[str, torch.Tensor]:
    """An ``output`` block with only vocabulary rows ``start:stop`` of the head, as ``lm_head``
    (taken from the embedding when the head is tied to it), plus the final norm."""
    if not 0 <= start < stop <= config.vocab_size:
        raise ConfigError(f"vocabulary range {start}:{stop} outside 0:{config.vocab_size}")
    if "lm_head" in output:
        src, name = output, "lm_head"
    elif embed is not None and "embed" in embed:
        src, name = embed, "embed"
    else:
        raise ConfigError("the head is tied to the embedding: slicing it needs the input block")
    out = {"norm": output["norm"].clone(), "lm_head": src[name][start:stop].contiguous()}
    if name + ".scale" in src:
        out["lm_head.scale"] = src[name + ".scale"][start:stop].contiguous()
    return out
