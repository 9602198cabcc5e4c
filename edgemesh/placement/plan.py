"""Who holds which slice of every layer, and what that costs (ALGORITHMS §1): a pure function.

Split. Every device gets a share of the decoder proportional to its GFLOP/s; a device whose
memory cannot hold its share is capped at what fits and the rest is re-spread over the others
(water-filling). MLP rows follow the shares (largest remainder per layer). KV groups are
coarse, so each layer's groups go greedily to whoever finishes that layer first, within what
the device's memory holds (3 groups over 2 equal devices alternate 2/1, 1/2). A device may end with nothing; the master (rank 0,
first device) always stays because it holds embedding, final norm and lm_head.

Cost of one decode token (batch 1):
- compute: per layer the slowest attention slice plus the slowest MLP slice (each block ends
  in an allreduce, so everyone waits for the slowest), plus the master's lm_head. A slice
  costs max(2·params / GFLOP/s, bytes / memory bandwidth): decode reads every weight once.
- allreduce latency: 2·L star allreduces, each one round trip to the farthest worker, plus
  half a round trip for the master's broadcast of the hidden state.
- bandwidth: per allreduce the hub receives and sends (W−1)·H values; its link carries them
  one after another (conservative: the hub's NIC is shared by all its links).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from edgemesh.errors import ConfigError
from edgemesh.placement.devices import Device, Link, link_between
from edgemesh.weights.config import ModelConfig
from edgemesh.weights.shard import ShardSpec, split_layer, vocab_range

# Python + torch + buffers on each participant, measured ~250-350 MB for a worker process.
RUNTIME_OVERHEAD_BYTES = 384 << 20
GiB = 1 << 30
CHOICE_BYTES = 5 * 8  # a rank's summary for a greedy choice (llm.choice): range, max, index


@dataclass(frozen=True)
class Sizes:
    """Bytes and FLOPs of the units the planner hands out."""

    group_bytes: int  # weights of one KV group in one layer
    group_kv_bytes: int  # its KV cache at the planned context
    row_bytes: int  # one MLP intermediate row (gate, up, down column)
    layer_fixed_bytes: int  # replicated norms (+ output biases on rank 0)
    master_bytes: int  # embedding (the master looks tokens up for the group) and final norm
    dtype_bytes: int
    head_row_bytes: int = 0  # one vocabulary row of the LM head, on whichever rank holds it

    @classmethod
    def of(cls, c: ModelConfig, context_len: int, dtype_bytes: int) -> Sizes:
        h, d, g = c.hidden_size, c.head_dim, c.group_size
        group = (2 * g * d * h + 2 * d * h + ((g + 2) * d if c.qkv_bias else 0)) * dtype_bytes
        row = (3 * h + (2 if c.mlp_bias else 0)) * dtype_bytes
        # The head is split by vocabulary rows in proportion to the MLP rows (weights.shard.
        # vocab_range), so it is planned like them; a tied head's rows on the master are in the
        # embedding already (counted twice there: a small over-estimate, on the safe side).
        master = c.vocab_size * h + h
        return cls(group, 2 * context_len * d * 4, row, 2 * h * dtype_bytes, master * dtype_bytes, dtype_bytes,
                   h * dtype_bytes)

    def model_bytes(self, c: ModelConfig) -> int:
        """The weights shared out between the ranks: decoder slices and the head's rows."""
        return (c.num_hidden_layers * (c.num_key_value_heads * self.group_bytes + c.intermediate_size * self.row_bytes)
                + c.vocab_size * self.head_row_bytes)


@dataclass(frozen=True)
class DevicePlan:
    id: str
    rank: int
    share: float  # fraction of the decoder it was meant to get
    kv_groups: int  # total over layers
    mlp_rows: int  # total over layers
    weight_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int
    mem_bytes: int  # predicted total
    mem_limit: int
    compute_ms: float  # its own decoder slices, one token


@dataclass(frozen=True)
class Latency:
    compute_ms: float
    allreduce_latency_ms: float
    bandwidth_ms: float
    total_ms: float
    allreduces_per_token: int
    bytes_per_token: int  # on the hub's link, both directions


@dataclass
class Plan:
    model: str
    config: dict[str, Any]
    context_len: int
    dtype_bytes: int
    devices: list[DevicePlan]
    layers: list[list[ShardSpec]]  # layers[i][rank]
    latency: Latency
    notes: list[str] = field(default_factory=list)
    # Sliding weight window (ALGORITHMS §3; placement/budget.py): blocks resident per device,
    # 0 = all weights in memory; the budget it was planned for (0 = none) and, per device,
    # the predicted peak and the no-stall check.
    window: int = 0
    memory_budget: int = 0
    window_checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return len(self.devices)

    def specs_for(self, rank: int) -> list[ShardSpec]:
        """Rank's spec of every layer (what ``Participant`` takes)."""
        return [layer[rank] for layer in self.layers]

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "config": self.config, "context_len": self.context_len,
            "dtype_bytes": self.dtype_bytes, "devices": [asdict(d) for d in self.devices],
            "layers": [[s.to_json() for s in layer] for layer in self.layers],
            "latency": asdict(self.latency), "notes": list(self.notes),
            "window": self.window, "memory_budget": self.memory_budget, "window_checks": list(self.window_checks),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Plan:
        return cls(
            d["model"], d["config"], int(d["context_len"]), int(d["dtype_bytes"]),
            [DevicePlan(**x) for x in d["devices"]],
            [[ShardSpec.from_json(s) for s in layer] for layer in d["layers"]],
            Latency(**d["latency"]), list(d.get("notes", [])),
            int(d.get("window", 0)), int(d.get("memory_budget", 0)), list(d.get("window_checks", [])),
        )


def _fmt(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _water_fill(speeds: list[float], caps: list[float]) -> list[float]:
    """Shares ∝ speed, each ≤ its cap, summing to 1 (caller checks Σ caps ≥ 1)."""
    share = [0.0] * len(speeds)
    free = [i for i, s in enumerate(speeds) if s > 0 and caps[i] > 0]
    left = 1.0
    while free:
        total = sum(speeds[i] for i in free)
        over = [i for i in free if left * speeds[i] / total > caps[i]]
        if not over:
            for i in free:
                share[i] = left * speeds[i] / total
            break
        for i in over:
            share[i] = caps[i]
            left -= caps[i]
            free.remove(i)
    return share


def _apportion(targets: list[float], total: int) -> list[int]:
    """Integers summing to ``total``, each within 1 of its target (largest remainder)."""
    base = [int(t) for t in targets]
    rest = total - sum(base)
    order = sorted(range(len(targets)), key=lambda i: (base[i] - targets[i], i))
    for i in order[:max(rest, 0)]:
        base[i] += 1
    return base


def _slice_ms(dev: Device, params: int, bytes_: int) -> float:
    t = 2.0 * params / (dev.gflops * 1e9) if dev.gflops > 0 else 0.0
    if dev.mem_bw_gbps > 0:
        t = max(t, bytes_ / (dev.mem_bw_gbps * 1e9))
    return 1e3 * t


def plan(
    config: ModelConfig,
    devices: list[Device],
    links: list[Link] | None = None,
    *,
    model: str = "",
    context_len: int = 2048,
    dtype_bytes: int = 4,
    overhead_bytes: int = RUNTIME_OVERHEAD_BYTES,
    mlp_unit: int = 1,
) -> Plan:
    """Split ``config`` over ``devices`` (first = master) or raise ``ConfigError`` with the numbers.

    ``mlp_unit``: every rank's MLP rows are a multiple of it (a q4 model's ``w_down`` is cut
    into whole groups of 32 columns: ``weights.quant.split_unit``)."""
    if not devices:
        raise ConfigError("no devices to plan for")
    if len({d.id for d in devices}) != len(devices):
        raise ConfigError("device ids must be unique")
    links = links or []
    c = config
    sz = Sizes.of(c, context_len, dtype_bytes)
    L, K, F = c.num_hidden_layers, c.num_key_value_heads, c.intermediate_size
    if mlp_unit < 1 or F % mlp_unit:
        raise ConfigError(f"the MLP width {F} of this model is not a multiple of {mlp_unit}, the unit its "
                          "weight format can be split by (q4 needs multiples of 32; use int8 or fp32)")
    # Per device: memory left for decoder slices after runtime, replicated norms and (master) head.
    fixed_w = overhead_bytes + L * sz.layer_fixed_bytes
    if devices[0].mem_bytes - fixed_w - sz.master_bytes < 0:
        raise ConfigError(
            f"master {devices[0].id!r} cannot hold embedding + runtime: needs "
            f"{_fmt(fixed_w + sz.master_bytes)}, has {_fmt(devices[0].mem_bytes)}"
        )
    # A worker that cannot hold a runtime, or computes nothing, would only add allreduce latency.
    notes = [f"{d.id}: left out ({'no compute' if d.gflops <= 0 else f'{_fmt(d.mem_bytes)} memory is less than the runtime needs'})"
             for d in devices[1:] if d.gflops <= 0 or d.mem_bytes - fixed_w <= 0]
    devices = [devices[0]] + [d for d in devices[1:] if d.gflops > 0 and d.mem_bytes - fixed_w > 0]
    n = len(devices)
    fixed = [fixed_w + (sz.master_bytes if i == 0 else 0) for i in range(n)]
    room = [d.mem_bytes - f for d, f in zip(devices, fixed)]
    if room[0] < 0:
        raise ConfigError(
            f"master {devices[0].id!r} cannot hold embedding + lm_head + runtime: needs {_fmt(fixed[0])}, "
            f"has {_fmt(devices[0].mem_bytes)}"
        )
    # Everything a full decoder needs (weights + KV cache + the head's rows), the unit of "share".
    head_all = c.vocab_size * sz.head_row_bytes
    decoder = L * (K * (sz.group_bytes + sz.group_kv_bytes) + F * sz.row_bytes) + head_all
    # 2 % headroom: integer rounding can give a device slightly more than its share.
    caps = [max(r, 0) / decoder * 0.98 for r in room]
    if sum(caps) < 1.0:
        have = sum(max(r, 0) for r in room)
        raise ConfigError(
            f"model does not fit: the decoder needs {_fmt(decoder)} (weights {_fmt(sz.model_bytes(c))} + KV cache "
            f"{_fmt(L * K * sz.group_kv_bytes)} at {context_len} tokens) but the {n} device(s) have {_fmt(have)} free "
            f"after runtime ({_fmt(overhead_bytes)} each) and the master's embedding ({_fmt(sz.master_bytes)}); "
            "add devices, shorten the context or use a smaller dtype"
        )
    share = _water_fill([d.gflops for d in devices], caps)

    # Attention: each layer's K groups go one by one to the device that would finish the layer
    # earliest (KV groups are coarse: a slow device holding one would stall the whole layer),
    # (ties: the one that has used the least of its budget) within the groups its memory holds next to its MLP rows.
    mlp_bytes = [share[k] * (F * L * sz.row_bytes + head_all) for k in range(n)]  # MLP rows and head rows
    budget = [int(max(room[k] * 0.98 - mlp_bytes[k], 0) // (sz.group_bytes + sz.group_kv_bytes)) for k in range(n)]
    speed = [d.gflops if share[k] > 0 else 0.0 for k, d in enumerate(devices)]
    layers: list[list[ShardSpec]] = []
    given = [0] * n
    for _ in range(L):
        groups = [0] * n
        for _ in range(K):
            ok = [k for k in range(n) if speed[k] > 0 and given[k] < budget[k]]
            if not ok:  # only via rounding: the device with the most memory left takes it
                ok = [max(range(n), key=lambda k: budget[k] - given[k])]
            k = min(ok, key=lambda k: ((groups[k] + 1) / speed[k] if speed[k] else math.inf,
                                       given[k] / max(budget[k], 1), k))
            groups[k] += 1
            given[k] += 1
        rows = [mlp_unit * r for r in _apportion([share[k] * F / mlp_unit for k in range(n)], F // mlp_unit)]
        layers.append(split_layer(c, groups, rows))

    overhead = overhead_bytes
    per_dev: list[DevicePlan] = []
    attn_ms = [[0.0] * n for _ in range(L)]
    mlp_ms = [[0.0] * n for _ in range(L)]
    vocab_rows = [b - a for a, b in (vocab_range(c, [layer[k] for layer in layers], k, n) for k in range(n))]
    for k, dev in enumerate(devices):
        g_tot = sum(len(layers[i][k].kv_groups) for i in range(L))
        r_tot = sum(layers[i][k].mlp_size for i in range(L))
        weights = g_tot * sz.group_bytes + r_tot * sz.row_bytes + L * sz.layer_fixed_bytes
        weights += vocab_rows[k] * sz.head_row_bytes + (sz.master_bytes if k == 0 else 0)
        kv = g_tot * sz.group_kv_bytes
        for i in range(L):
            ng, nr = len(layers[i][k].kv_groups), layers[i][k].mlp_size
            attn_ms[i][k] = _slice_ms(dev, ng * sz.group_bytes // dtype_bytes, ng * sz.group_bytes)
            mlp_ms[i][k] = _slice_ms(dev, nr * sz.row_bytes // dtype_bytes, nr * sz.row_bytes)
        total = weights + kv + overhead
        per_dev.append(DevicePlan(dev.id, k, round(share[k], 6), g_tot, r_tot, weights, kv, overhead, total,
                                  dev.mem_bytes, round(sum(attn_ms[i][k] + mlp_ms[i][k] for i in range(L)), 4)))
        if total > dev.mem_bytes:  # only reachable through rounding beyond the headroom
            raise ConfigError(f"device {dev.id!r} would need {_fmt(total)} but has {_fmt(dev.mem_bytes)}")

    master = devices[0]
    compute = sum(max(attn_ms[i]) + max(mlp_ms[i]) for i in range(L))
    # Every rank runs its rows of the head at the same time: the slowest counts.
    compute += max(_slice_ms(d, rows * c.hidden_size, rows * sz.head_row_bytes) for d, rows in zip(devices, vocab_rows))
    workers = [link_between(master, d, links) for d in devices[1:]]
    rtt = max((lk.rtt_ms for lk in workers), default=0.0)
    n_ar = 2 * L
    latency_ms = n_ar * rtt + (rtt if n > 1 else 0.0)  # + half a round trip each: the broadcast, the choice's gather
    msg = c.hidden_size * 4  # fp32 activations
    hub_bw = min((lk.bandwidth_mbit for lk in workers), default=0.0)
    # in + out per allreduce, the broadcast, and each worker's greedy choice summary (5 float64)
    hub_bytes = (2 * n_ar + 1) * (n - 1) * msg + (n - 1) * CHOICE_BYTES
    bandwidth_ms = 1e3 * hub_bytes * 8 / (hub_bw * 1e6) if hub_bw > 0 else 0.0
    lat = Latency(round(compute, 4), round(latency_ms, 4), round(bandwidth_ms, 4),
                  round(compute + latency_ms + bandwidth_ms, 4), n_ar, hub_bytes)

    notes += [f"{devices[k].id}: capped by memory at {share[k]:.1%} of the decoder (speed alone would give more)"
              for k in range(n) if share[k] >= caps[k] - 1e-12 and share[k] > 0 and n > 1]
    return Plan(model, c.to_json(), context_len, dtype_bytes, per_dev, layers, lat, notes)
