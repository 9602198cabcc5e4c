"""Device profiles (``nodes/*.toml``): what a Pi 4 or an old laptop amounts to on this host.

A profile gives the CPU share in *host* cores (the cgroup quota), the memory a process may use,
the disk read rate, and the access link such a device typically has. Each file cites where its
numbers come from.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemesh.errors import ConfigError


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    cpu_cores: int
    cpu_quota: float  # host cores
    memory_mib: int
    disk_read_mbyte_s: float | None
    link: dict[str, float]

    def link_values(self) -> dict[str, float | None]:
        return dict(self.link)


def _num(table: dict[str, Any], key: str, file: Path) -> float:
    value = table.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"{file}: {key} must be a non-negative number, got {value!r}")
    return float(value)


def available_profiles(nodes_dir: Path) -> list[str]:
    return sorted(p.stem for p in nodes_dir.glob("*.toml"))


def load_profile(nodes_dir: Path, name: str) -> DeviceProfile:
    path = nodes_dir / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(available_profiles(nodes_dir)) or f"none found in {nodes_dir}"
        raise ConfigError(f"unknown device profile {name!r}; profiles: {known}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    cpu = data.get("cpu", {})
    memory = data.get("memory", {})
    disk = data.get("disk", {})
    link = data.get("link", {})
    link_keys = ("up_mbit", "down_mbit", "delay_ms", "jitter_ms", "loss_pct")
    unknown = [k for k in link if k not in link_keys]
    if unknown:
        raise ConfigError(f"{path}: link.{unknown[0]}: unknown key; expected one of: {', '.join(link_keys)}")
    return DeviceProfile(
        name=name,
        description=str(data.get("description", "")),
        cpu_cores=int(_num(cpu, "cores", path)),
        cpu_quota=_num(cpu, "quota", path),
        memory_mib=int(_num(memory, "mib", path)),
        disk_read_mbyte_s=_num(disk, "read_mbyte_s", path) if "read_mbyte_s" in disk else None,
        link={k: _num(link, k, path) for k in link_keys if k in link},
    )
