"""Planner inputs: devices (speed, memory) and the links between them, from measured profiles
(``edgemesh.mesh.profile``) or from device profile files (``nodes/*.toml``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from edgemesh.errors import ConfigError

# A profile file gives CPU cores, not GFLOP/s: this converts (fp32 matmul per core, a
# mid-range x86 core with AVX2; override with the host's measured value).
DEFAULT_GFLOPS_PER_CORE = 25.0
# Memory bandwidth per core share: decode is a matrix-vector product, bound by reading weights.
DEFAULT_MEM_BW_GBPS_PER_CORE = 5.0


@dataclass(frozen=True)
class Device:
    id: str
    gflops: float  # sustained fp32 matmul GFLOP/s
    mem_bytes: int  # memory edgemesh may use on this device
    mem_bw_gbps: float = 0.0  # weight-read bandwidth GB/s; 0 = unknown (compute-bound estimate)
    disk_mbyte_s: float = 0.0
    # access link of the device (for profile files; measured links take precedence)
    link_mbit: float = 1000.0
    link_delay_ms: float = 0.05

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Device:
        return cls(**d)

    @classmethod
    def from_profile(cls, device_id: str, profile: dict[str, Any], *,
                     gflops_per_core: float = DEFAULT_GFLOPS_PER_CORE) -> Device:
        """From a measured profile dict (gflops, mem_available, limits) or a ``nodes/*.toml`` dict."""
        try:
            if "gflops" in profile and profile["gflops"]:
                gflops = float(profile["gflops"])
                cores = float((profile.get("limits") or {}).get("cpu_cores") or profile.get("cpu_logical") or 1)
            else:
                cpu = profile.get("cpu", {})
                cores = float(cpu.get("quota") or cpu.get("cores") or 1)
                gflops = cores * gflops_per_core
            limit = (profile.get("limits") or {}).get("mem_bytes")
            if "memory" in profile:
                mem = int(float(profile["memory"]["mib"]) * (1 << 20))
            else:
                mem = int(limit or profile.get("mem_available") or profile["mem_total"])
            link = profile.get("link", {})
            return cls(
                id=device_id,
                gflops=gflops,
                mem_bytes=mem,
                mem_bw_gbps=float(profile.get("mem_bw_gbps") or cores * DEFAULT_MEM_BW_GBPS_PER_CORE),
                disk_mbyte_s=float((profile.get("disk") or {}).get("read_mbyte_s") or profile.get("disk_read_mbps") or 0),
                link_mbit=float(min(link.get("up_mbit", 1000.0), link.get("down_mbit", 1000.0))),
                link_delay_ms=float(link.get("delay_ms", 0.05)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"device {device_id!r}: unusable profile ({exc!r}); needs gflops or [cpu], and memory") from None


@dataclass(frozen=True)
class Link:
    """A measured path between two devices (symmetric)."""

    a: str
    b: str
    rtt_ms: float
    bandwidth_mbit: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def link_between(a: Device, b: Device, links: list[Link]) -> Link:
    """The measured link, else one derived from both access links (star through a switch)."""
    for link in links:
        if {link.a, link.b} == {a.id, b.id}:
            return link
    return Link(a.id, b.id, 2 * (a.link_delay_ms + b.link_delay_ms), min(a.link_mbit, b.link_mbit))


def uniform_devices(n: int, *, gflops: float, mem_bytes: int, mem_bw_gbps: float = 0.0,
                    link_mbit: float = 10_000.0, link_delay_ms: float = 0.05) -> list[Device]:
    """``n`` identical devices (``edgemesh plan --nodes N``)."""
    if n < 1:
        raise ConfigError(f"--nodes must be >= 1, got {n}")
    return [Device(f"node{i}", gflops, mem_bytes, mem_bw_gbps, 0.0, link_mbit, link_delay_ms) for i in range(n)]
