"""Placing ViT sub-models on devices (ED-ViT, ALGORITHMS §4 step 3), as a pure function.

Greedy list scheduling: parts in decreasing order of compute (then memory), each to the device
that would finish it earliest among those with memory left for it. A device given several parts
runs them one after another, so its finish time is the sum of their compute times; the slowest
device's finish time (the makespan) is the predicted latency of one image.

A part's time on a device is its FLOPs at the device's GFLOP/s plus a fixed cost per tensor
operation: these sub-models are so small (≈10⁵–10⁶ FLOPs per image) that launching the ~15
operations of each block costs more than the arithmetic (5 µs per operation is what one x86
core spends in PyTorch eager mode here).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from edgemesh.errors import ConfigError
from edgemesh.placement.devices import Device


class PlacementError(ConfigError):
    """No device has the memory for a part."""


@dataclass(frozen=True)
class PartDemand:
    name: str
    flops: int  # per image
    mem_bytes: int  # weights + working memory
    ops: int = 0  # tensor operations per forward pass (fixed per-operation overhead)


@dataclass(frozen=True)
class Assignment:
    part: str
    device: str
    start_ms: float
    finish_ms: float


@dataclass
class VitPlacement:
    assignments: list[Assignment]
    makespan_ms: float

    def device_of(self, part: str) -> str:
        return next(a.device for a in self.assignments if a.part == part)

    def latency_ms(self, part: str) -> float:
        a = next(a for a in self.assignments if a.part == part)
        return a.finish_ms - a.start_ms

    def to_json(self) -> dict[str, Any]:
        return {"assignments": [asdict(a) for a in self.assignments], "makespan_ms": self.makespan_ms}


OP_OVERHEAD_US = 5.0


def compute_ms(flops: int, device: Device, ops: int = 0, op_us: float = OP_OVERHEAD_US) -> float:
    return flops / (device.gflops * 1e9) * 1e3 + ops * op_us / 1e3


def place_parts(parts: list[PartDemand], devices: list[Device], *, op_us: float = OP_OVERHEAD_US) -> VitPlacement:
    """Largest part first, to the device with the earliest finish time that has memory for it.

    Ties go to the device listed first, so the result is deterministic."""
    if not devices:
        raise PlacementError("no devices to place the sub-models on")
    free = {d.id: d.mem_bytes for d in devices}
    busy = {d.id: 0.0 for d in devices}
    out: list[Assignment] = []
    for p in sorted(parts, key=lambda p: (-p.flops, -p.mem_bytes, p.name)):
        fits = [d for d in devices if free[d.id] >= p.mem_bytes]
        if not fits:
            most = max(devices, key=lambda d: free[d.id])
            raise PlacementError(f"no device has memory for {p.name} ({p.mem_bytes / 2**20:.1f} MiB); the most "
                                 f"free is {most.id} with {free[most.id] / 2**20:.1f} MiB: add a device or use more parts")
        best = min(fits, key=lambda d: busy[d.id] + compute_ms(p.flops, d, p.ops, op_us))
        start = busy[best.id]
        busy[best.id] = start + compute_ms(p.flops, best, p.ops, op_us)
        free[best.id] -= p.mem_bytes
        out.append(Assignment(p.name, best.id, start, busy[best.id]))
    return VitPlacement(out, max(a.finish_ms for a in out) if out else 0.0)


def part_memory(params: int, tokens: int, dim: int, widest: int, batch: int = 1, dtype_bytes: int = 4) -> int:
    """Weights plus the largest activations of one forward pass (a few token × width buffers)."""
    return params * dtype_bytes + 4 * batch * tokens * max(dim, widest) * dtype_bytes
