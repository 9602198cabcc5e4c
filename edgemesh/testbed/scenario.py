"""Scenario files (``emulation/*.toml``): sites, devices, links, optional STUN/TURN and workload.

A scenario is data only. Everything is validated here, once, with errors that name the file,
line and key (``lan-4.toml:12: devices.dev1.link.delay_ms: must be >= 0``), so the command
builders downstream can trust every value they get.

Link numbers are per direction and one-way: ``delay_ms = 10`` adds 10 ms each way (20 ms to the
round trip over that link), ``loss_pct = 2`` drops 2 % of packets in each direction.
Devices take their numbers from a profile in ``nodes/``, then the scenario's ``[defaults]``,
then their own table (last one wins).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

from edgemesh.errors import ConfigError
from edgemesh.testbed.profiles import DeviceProfile, load_profile
from edgemesh.testbed.tomlsource import KeyLines

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,15}$")
# The emulated internet lives on TEST-NET-3; site subnets must not overlap it.
WAN_SUBNET = ipaddress.IPv4Network("203.0.113.0/24")


class NatType(str, Enum):
    NONE = "none"
    FULL_CONE = "full-cone"
    RESTRICTED = "restricted"
    PORT_RESTRICTED = "port-restricted"
    SYMMETRIC = "symmetric"


@dataclass(frozen=True)
class LinkSpec:
    """One emulated link, both directions. ``None`` bandwidth means unshaped."""

    up_mbit: float | None = None
    down_mbit: float | None = None
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0

    @property
    def needs_delay(self) -> bool:
        return self.delay_ms > 0 or self.jitter_ms > 0


@dataclass(frozen=True)
class Site:
    name: str
    subnet: ipaddress.IPv4Network
    nat: NatType
    uplink: LinkSpec


@dataclass(frozen=True)
class Device:
    name: str
    site: str
    profile: str
    cpus: float | None  # host cores; None = uncapped
    memory_mib: int | None  # None = uncapped
    disk_read_mbyte_s: float | None
    link: LinkSpec


@dataclass(frozen=True)
class Server:
    """coturn in its own namespace on the emulated internet, as STUN and (optionally) TURN."""

    turn: bool = True
    user: str = "edge"
    password: str = "secret"
    realm: str = "edgemesh"


@dataclass(frozen=True)
class Workload:
    command: tuple[str, ...]
    on: str  # device name
    daemons: bool = True


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    sites: tuple[Site, ...]
    devices: tuple[Device, ...]
    server: Server | None = None
    workload: Workload | None = None
    source: Path | None = field(default=None, compare=False)

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    def device(self, name: str) -> Device:
        for d in self.devices:
            if d.name == name:
                return d
        known = ", ".join(d.name for d in self.devices)
        raise ConfigError(f"scenario {self.name!r} has no device {name!r}; devices: {known}")

    def devices_in(self, site: str) -> tuple[Device, ...]:
        return tuple(d for d in self.devices if d.site == site)


class _Reader:
    """Typed access to one TOML table that remembers where it came from, for error messages."""

    def __init__(self, data: Mapping[str, Any], path: tuple[str, ...], where: _Where) -> None:
        self.data = data
        self.path = path
        self.where = where
        self.used: set[str] = set()

    def fail(self, key: str | None, message: str) -> ConfigError:
        path = self.path + ((key,) if key else ())
        return self.where.error(path, message)

    def _get(self, key: str, kinds: tuple[type, ...], kind_name: str) -> Any:
        self.used.add(key)
        if key not in self.data:
            return None
        value = self.data[key]
        if isinstance(value, bool) and bool not in kinds:
            raise self.fail(key, f"must be {kind_name}, got {value!r}")
        if not isinstance(value, kinds):
            raise self.fail(key, f"must be {kind_name}, got {type(value).__name__} {value!r}")
        return value

    def str(self, key: str, default: str | None = None) -> str | None:
        value = self._get(key, (str,), "a string")
        return default if value is None else value

    def bool(self, key: str, default: bool) -> bool:
        value = self._get(key, (bool,), "true or false")
        return default if value is None else value

    def number(self, key: str, *, minimum: float = 0.0, maximum: float | None = None) -> float | None:
        value = self._get(key, (int, float), "a number")
        if value is None:
            return None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum:g} and {maximum:g}" if maximum is not None else f">= {minimum:g}"
            raise self.fail(key, f"must be {bound}, got {value!r}")
        return float(value)

    def table(self, key: str) -> _Reader | None:
        value = self._get(key, (dict,), "a table")
        return None if value is None else _Reader(value, self.path + (key,), self.where)

    def str_list(self, key: str) -> tuple[str, ...] | None:
        value = self._get(key, (list, str), "a list of strings")
        if value is None:
            return None
        if isinstance(value, str):
            raise self.fail(key, "must be a list of strings (argv), e.g. [\"edgemesh\", \"status\"]")
        if not value or not all(isinstance(v, str) for v in value):
            raise self.fail(key, "must be a non-empty list of strings")
        return tuple(value)

    def finish(self, allowed_hint: str = "") -> None:
        unknown = [k for k in self.data if k not in self.used]
        if unknown:
            known = ", ".join(sorted(self.used))
            raise self.fail(unknown[0], f"unknown key; expected one of: {known}{allowed_hint}")


@dataclass(frozen=True)
class _Where:
    file: str
    lines: KeyLines

    def error(self, path: tuple[str, ...], message: str) -> ConfigError:
        line = self.lines.line_of(path)
        loc = f"{self.file}:{line}" if line else self.file
        return ConfigError(f"{loc}: {'.'.join(path)}: {message}")


_LINK_KEYS = ("mbit", "up_mbit", "down_mbit", "delay_ms", "jitter_ms", "loss_pct")


def _read_link(reader: _Reader | None, base: dict[str, float | None]) -> dict[str, float | None]:
    """Overlay one link table onto ``base``; ``mbit`` sets both directions."""
    out = dict(base)
    if reader is None:
        return out
    both = reader.number("mbit", minimum=0.001)
    if both is not None:
        out["up_mbit"] = out["down_mbit"] = both
    for key in ("up_mbit", "down_mbit"):
        value = reader.number(key, minimum=0.001)
        if value is not None:
            out[key] = value
    for key, maximum in (("delay_ms", 10_000.0), ("jitter_ms", 10_000.0), ("loss_pct", 100.0)):
        value = reader.number(key, maximum=maximum)
        if value is not None:
            out[key] = value
    reader.finish()
    if (out.get("jitter_ms") or 0.0) > (out.get("delay_ms") or 0.0):
        raise reader.fail("jitter_ms", f"({out['jitter_ms']:g}) must not exceed delay_ms ({out.get('delay_ms') or 0:g})")
    return out


def _link_from(values: dict[str, float | None]) -> LinkSpec:
    return LinkSpec(
        up_mbit=values.get("up_mbit"),
        down_mbit=values.get("down_mbit"),
        delay_ms=values.get("delay_ms") or 0.0,
        jitter_ms=values.get("jitter_ms") or 0.0,
        loss_pct=values.get("loss_pct") or 0.0,
    )


def _check_name(reader: _Reader, kind: str, name: str) -> None:
    if not _NAME.match(name):
        raise reader.where.error(
            reader.path,
            f"{kind} name {name!r} must be 1-16 characters of a-z, 0-9 and '-', starting with a letter",
        )


def _default_subnet(index: int, nat: NatType) -> ipaddress.IPv4Network:
    # Sites behind a NAT get RFC 1918 space; public sites get the RFC 2544 benchmarking range,
    # which is neither private (coturn's private-peer filter leaves it alone) nor routable.
    if nat is NatType.NONE:
        return ipaddress.IPv4Network(f"198.18.{index}.0/24")
    return ipaddress.IPv4Network(f"10.{index + 1}.0.0/24")


def parse_scenario(text: str, *, file: str, nodes_dir: Path) -> Scenario:
    """Validate scenario TOML ``text``; ``file`` is only used in error messages."""
    where = _Where(file, KeyLines.scan(text))
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    root = _Reader(data, (), where)
    name = root.str("name") or Path(file).stem
    description = root.str("description", "") or ""

    defaults = root.table("defaults")
    default_profile: str | None = None
    default_link: dict[str, float | None] = {}
    default_caps: dict[str, float | None] = {}
    if defaults is not None:
        default_profile = defaults.str("profile")
        default_link = _read_link(defaults.table("link"), {})
        default_caps = {
            "cpus": defaults.number("cpus", minimum=0.01),
            "memory_mib": defaults.number("memory_mib", minimum=16),
            "disk_read_mbyte_s": defaults.number("disk_read_mbyte_s", minimum=0.1),
        }
        defaults.finish()

    sites_table = root.table("sites")
    if sites_table is None or not sites_table.data:
        raise where.error(("sites",), "at least one site is needed, e.g. [sites.home] with nat = \"none\"")
    sites: list[Site] = []
    for index, site_name in enumerate(sites_table.data):
        reader = sites_table.table(site_name)
        assert reader is not None
        _check_name(reader, "site", site_name)
        nat_text = reader.str("nat", "none") or "none"
        try:
            nat = NatType(nat_text)
        except ValueError:
            choices = ", ".join(t.value for t in NatType)
            raise reader.fail("nat", f"{nat_text!r} is not a NAT type; use one of: {choices}") from None
        subnet_text = reader.str("subnet")
        if subnet_text is None:
            subnet = _default_subnet(index, nat)
        else:
            try:
                subnet = ipaddress.IPv4Network(subnet_text)
            except ValueError as exc:
                raise reader.fail("subnet", f"not an IPv4 network: {exc}") from None
            if subnet.prefixlen > 29:
                raise reader.fail("subnet", "must be /29 or larger (router + devices need addresses)")
        uplink = _link_from(_read_link(reader.table("uplink"), {}))
        reader.finish()
        sites.append(Site(site_name, subnet, nat, uplink))
    sites_table.finish()

    for i, a in enumerate(sites):
        if a.subnet.overlaps(WAN_SUBNET):
            raise where.error(("sites", a.name, "subnet"), f"{a.subnet} overlaps the emulated internet {WAN_SUBNET}")
        for b in sites[i + 1 :]:
            if a.subnet.overlaps(b.subnet):
                raise where.error(("sites", b.name, "subnet"), f"{b.subnet} overlaps site {a.name!r} ({a.subnet})")

    devices_table = root.table("devices")
    if devices_table is None or not devices_table.data:
        raise where.error(("devices",), "at least one device is needed, e.g. [devices.dev1] with profile = \"pi4\"")
    devices: list[Device] = []
    site_names = [s.name for s in sites]
    for dev_name in devices_table.data:
        reader = devices_table.table(dev_name)
        assert reader is not None
        _check_name(reader, "device", dev_name)
        site_name = reader.str("site")
        if site_name is None:
            if len(sites) != 1:
                raise reader.fail("site", f"missing; which site is it in? one of: {', '.join(site_names)}")
            site_name = sites[0].name
        elif site_name not in site_names:
            raise reader.fail("site", f"unknown site {site_name!r}; sites: {', '.join(site_names)}")
        profile_name = reader.str("profile") or default_profile
        profile: DeviceProfile | None = None
        if profile_name is not None:
            try:
                profile = load_profile(nodes_dir, profile_name)
            except ConfigError as exc:
                raise reader.fail("profile", str(exc)) from None
        link = dict(profile.link_values() if profile else {})
        link = {**link, **{k: v for k, v in default_link.items() if v is not None}}
        link = _read_link(reader.table("link"), link)

        def pick(key: str, profile_value: float | None) -> float | None:
            own = reader.number(key, minimum={"cpus": 0.01, "memory_mib": 16.0}.get(key, 0.1))
            if own is not None:
                return own
            if default_caps.get(key) is not None:
                return default_caps[key]
            return profile_value

        cpus = pick("cpus", profile.cpu_quota if profile else None)
        memory = pick("memory_mib", float(profile.memory_mib) if profile else None)
        disk = pick("disk_read_mbyte_s", profile.disk_read_mbyte_s if profile else None)
        reader.finish()
        devices.append(
            Device(
                name=dev_name,
                site=site_name,
                profile=profile_name or "",
                cpus=cpus,
                memory_mib=int(memory) if memory is not None else None,
                disk_read_mbyte_s=disk,
                link=_link_from(link),
            )
        )
    devices_table.finish()
    for site in sites:
        members = [d for d in devices if d.site == site.name]
        if len(members) > site.subnet.num_addresses - 3:
            raise where.error(("sites", site.name, "subnet"), f"{site.subnet} is too small for {len(members)} devices")

    server: Server | None = None
    srv = root.table("server")
    if srv is not None:
        server = Server(
            turn=srv.bool("turn", True),
            user=srv.str("user", "edge") or "edge",
            password=srv.str("password", "secret") or "secret",
            realm=srv.str("realm", "edgemesh") or "edgemesh",
        )
        srv.finish()

    workload: Workload | None = None
    wl = root.table("workload")
    if wl is not None:
        command = wl.str_list("command")
        if command is None:
            raise wl.fail("command", "missing; the argv to run, e.g. [\"edgemesh\", \"status\", \"--json\", \"-\"]")
        on = wl.str("on", devices[0].name) or devices[0].name
        if on not in [d.name for d in devices]:
            raise wl.fail("on", f"unknown device {on!r}")
        workload = Workload(command=command, on=on, daemons=wl.bool("daemons", True))
        wl.finish()

    root.finish()
    return Scenario(name, description, tuple(sites), tuple(devices), server, workload)


def default_nodes_dir(scenario_path: Path) -> Path:
    """``nodes/`` next to the scenario's ``emulation/`` folder (the repo layout)."""
    return scenario_path.resolve().parent.parent / "nodes"


def load_scenario(path: Path | str, *, nodes_dir: Path | None = None) -> Scenario:
    path = Path(path)
    if not path.exists() and not path.suffix:
        # `testbed up lan-4` means emulation/lan-4.toml
        candidate = Path("emulation") / f"{path}.toml"
        if candidate.exists():
            path = candidate
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read scenario {path}: {exc.strerror}; pass a file such as emulation/lan-4.toml") from None
    scenario = parse_scenario(text, file=str(path), nodes_dir=nodes_dir or default_nodes_dir(path))
    return replace(scenario, source=path.resolve())
