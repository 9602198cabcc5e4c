"""Names of everything a testbed creates, all derived from one short per-testbed prefix.

The prefix is what makes two testbeds coexist and what lets ``down`` sweep leftovers without
touching anything else: namespaces are ``<prefix>-...``, interfaces start with ``<prefix>``,
cgroups are ``edgemesh-<prefix>``, the run directory is ``/run/edgemesh-testbed/<prefix>``. Linux caps interface names at 15
characters, so the prefix is at most 6 and interface names are ``<prefix><kind><index>``.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from edgemesh.config import TestbedSettings
from edgemesh.errors import ConfigError

_PREFIX = re.compile(r"^[a-z][a-z0-9]{1,5}$")
IFNAME_MAX = 15
DEFAULT_RUN_ROOT = Path(TestbedSettings().run_root)


def derive_prefix(scenario_name: str) -> str:
    """A stable 5-character prefix for a scenario name: ``t`` + 4 base32 characters of its hash."""
    digest = hashlib.sha1(scenario_name.encode()).digest()
    return "t" + base64.b32encode(digest).decode().lower()[:4].replace("=", "a")


def check_prefix(prefix: str) -> str:
    if not _PREFIX.match(prefix):
        raise ConfigError(f"testbed prefix {prefix!r} must be 2-6 characters of a-z and 0-9, starting with a letter")
    return prefix


@dataclass(frozen=True)
class Names:
    prefix: str
    run_root: Path = DEFAULT_RUN_ROOT

    def __post_init__(self) -> None:
        check_prefix(self.prefix)

    # namespaces (names may be long; they are files under /run/netns)
    @property
    def wan_ns(self) -> str:
        return f"{self.prefix}-wan"

    @property
    def server_ns(self) -> str:
        return f"{self.prefix}-srv"

    def router_ns(self, site: str) -> str:
        return f"{self.prefix}-r-{site}"

    def device_ns(self, device: str) -> str:
        return f"{self.prefix}-d-{device}"

    def owns_netns(self, name: str) -> bool:
        return name.startswith(f"{self.prefix}-")

    # interfaces, <= 15 characters
    def ifname(self, kind: str, index: int | None = None) -> str:
        name = f"{self.prefix}{kind}{'' if index is None else index}"
        if len(name) > IFNAME_MAX:
            raise ConfigError(f"interface name {name!r} exceeds {IFNAME_MAX} characters; use a shorter --prefix")
        return name

    @property
    def wan_bridge(self) -> str:
        return self.ifname("br")

    @property
    def lan_bridge(self) -> str:
        return self.ifname("lan")

    def dev_if(self, i: int) -> str:
        """Device end of device i's access link (in the device namespace)."""
        return self.ifname("d", i)

    def dev_peer_if(self, i: int) -> str:
        """Router end of device i's access link (a port of the site's LAN bridge)."""
        return self.ifname("a", i)

    def dev_ifb(self, i: int) -> str:
        return self.ifname("i", i)

    def site_wan_if(self, s: int) -> str:
        """Router end of site s's uplink (in the router namespace)."""
        return self.ifname("w", s)

    def site_wan_peer_if(self, s: int) -> str:
        """Internet end of site s's uplink (a port of the wan bridge)."""
        return self.ifname("u", s)

    def site_ifb(self, s: int) -> str:
        return self.ifname("j", s)

    @property
    def server_if(self) -> str:
        return self.ifname("sv")

    @property
    def server_peer_if(self) -> str:
        return self.ifname("sw")

    # nft tables (inside our namespaces, prefixed anyway so they are recognisable)
    @property
    def nat_table(self) -> str:
        return f"{self.prefix}_nat"

    @property
    def loss_table(self) -> str:
        return f"{self.prefix}_loss"

    # cgroups and files
    @property
    def cgroup_group(self) -> str:
        return f"edgemesh-{self.prefix}"

    @property
    def run_dir(self) -> Path:
        return self.run_root / self.prefix

    @property
    def state_file(self) -> Path:
        return self.run_dir / "state.json"

    def device_dir(self, device: str) -> Path:
        return self.run_dir / "devices" / device
