"""Validated configuration: dataclasses with defaults, loaded from TOML with clear errors."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from edgemesh.errors import ConfigError

DEFAULT_PORT = 7700  # mesh port; the join port is port + 1


@dataclass(frozen=True)
class MeshConfig:
    """Timing of the control plane. Defaults mark a killed node dead within ~4 s."""

    heartbeat_interval: float = 0.5
    suspect_after: float = 2.0
    dead_after: float = 4.0
    gossip_interval: float = 1.0
    rpc_timeout: float = 3.0
    link_probe_interval: float = 60.0
    link_probe_bytes: int = 1 << 20
    profile_delay: float = 2.0  # let the mesh settle before measuring the device
    mdns: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval < self.suspect_after < self.dead_after:
            raise ConfigError(
                "mesh timing must satisfy 0 < heartbeat_interval < suspect_after < dead_after "
                f"(got {self.heartbeat_interval}, {self.suspect_after}, {self.dead_after})"
            )

    @classmethod
    def from_mapping(cls, data: dict[str, Any], where: str) -> MeshConfig:
        known = {f.name: f.type for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ConfigError(f"{where}: unknown key '{key}' in [mesh] (known: {', '.join(known)})")
        defaults = cls()
        values: dict[str, Any] = {}
        for key, value in data.items():
            want = type(getattr(defaults, key))
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, want) or (want is not bool and isinstance(value, bool)):
                raise ConfigError(f"{where}: [mesh] {key} must be a {want.__name__}, got {value!r}")
            values[key] = value
        return cls(**values)


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_mesh_config(path: Path | None) -> MeshConfig:
    """The [mesh] table of a node's config.toml, or defaults when the file does not exist."""
    if path is None or not path.exists():
        return MeshConfig()
    return MeshConfig.from_mapping(load_toml(path).get("mesh", {}), str(path))


def edgemesh_home() -> Path:
    """Where edgemesh keeps per-user state: $EDGEMESH_HOME or the platform's user data dir."""
    env = os.environ.get("EDGEMESH_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("edgemesh"))
