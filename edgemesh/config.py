"""Validated configuration: dataclasses with defaults, loaded from TOML with clear errors.

The defaults are written twice on purpose: here, so an installed package needs no data files,
and in the project's top-level ``configs/`` (daemon.toml, launch.toml, testbed.toml), which
users read and copy; ``tests/unit/test_configs.py`` fails when the two disagree.
"""

from __future__ import annotations

import os
import tomllib
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from edgemesh.errors import ConfigError

DEFAULT_PORT = 7700  # mesh port; the join port is port + 1

C = TypeVar("C")


def from_table(cls: type[C], data: dict[str, Any], table: str, where: str) -> C:
    """An instance of the dataclass ``cls`` from one TOML table: unknown keys and values of the
    wrong type are ``ConfigError``s naming the file and key; absent keys keep their defaults
    (a default of None is written by leaving the key out: TOML has no null)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: [{table}] must be a table")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key '{key}' in [{table}] (known: {', '.join(known)})")
        values[key] = _coerce(value, hints[key], f"{where}: [{table}] {key}")
    return cls(**values)


def _coerce(value: Any, hint: Any, what: str) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise ConfigError(f"{what} must be a list, got {value!r}")
        return tuple(_coerce(v, item, what) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
        raise ConfigError(f"{what} must be a {hint.__name__}, got {value!r}")
    return value


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
        return from_table(cls, data, "mesh", where)


@dataclass
class LaunchOptions:
    """How `edgemesh launch` places and runs a model (configs/launch.toml, [launch])."""

    nodes: int | None = None  # how many members, this one included; None = every alive member
    names: tuple[str, ...] = ()  # or these members (names or id prefixes)
    max_seq_len: int = 2048
    timeout: float = 5.0  # one collective may take this long before the group counts as failed
    algorithm: str = "auto"
    compression: str | None = None
    ready_timeout: float = 300.0  # every worker has its slices and is ready (weights travel meanwhile)
    start_timeout: float = 15.0  # a member's daemon answers `llm.start`
    contact_timeout: float = 30.0  # a started worker reaches our job server (Python start-up on a slow device)
    memory_budget: int | None = None  # bytes per device (--memory-budget): stream weights through a window if needed


@dataclass(frozen=True)
class TestbedSettings:
    """Where and how the emulated testbed runs its devices (configs/testbed.toml, [testbed])."""

    __test__ = False  # not a pytest class, despite the name

    run_root: str = "/run/edgemesh-testbed"  # state files of live testbeds
    daemon_port: int = DEFAULT_PORT  # the mesh port of every device's daemon
    netem: bool = True  # use tc netem for delay/loss when the kernel has it


def configs_dir() -> Path:
    """The project's ``configs/`` folder, in a source checkout or an editable install."""
    return Path(__file__).resolve().parent.parent / "configs"


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
    """The [mesh] table of a node's config.toml (configs/daemon.toml is one), or defaults when
    the file does not exist."""
    if path is None or not path.exists():
        return MeshConfig()
    return MeshConfig.from_mapping(load_toml(path).get("mesh", {}), str(path))


def load_launch_options(path: Path) -> LaunchOptions:
    """The [launch] table of a TOML file such as configs/launch.toml."""
    return from_table(LaunchOptions, load_toml(path).get("launch", {}), "launch", str(path))


def load_testbed_settings(path: Path) -> TestbedSettings:
    """The [testbed] table of a TOML file such as configs/testbed.toml."""
    return from_table(TestbedSettings, load_toml(path).get("testbed", {}), "testbed", str(path))


def edgemesh_home() -> Path:
    """Where edgemesh keeps per-user state: $EDGEMESH_HOME or the platform's user data dir."""
    env = os.environ.get("EDGEMESH_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("edgemesh"))
