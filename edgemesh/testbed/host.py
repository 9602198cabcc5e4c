"""What this host can do for a testbed: root, tools, netem, cgroups. Probed once per command.

The result is a plain dataclass handed to the (pure) builders, so ``up --dry-run`` and unit
tests can ask for "a host without netem" or "a host with cgroup v2" without being one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass, field

from edgemesh.errors import EdgemeshError
from edgemesh.testbed.cgroups import CgroupLayout

REQUIRED_TOOLS = ("ip", "tc", "nft", "sysctl")


class TestbedUnavailable(EdgemeshError):
    """The host cannot run an emulated testbed (not root, tools missing)."""

    exit_code = 4


@dataclass(frozen=True)
class HostCaps:
    netem: bool
    cgroups: CgroupLayout | None
    python: str = field(default_factory=lambda: sys.executable)
    turnserver: str | None = None


def is_root() -> bool:
    return os.geteuid() == 0


def missing_tools() -> list[str]:
    return [t for t in REQUIRED_TOOLS if shutil.which(t) is None]


def require_root_and_tools() -> None:
    if not is_root():
        raise TestbedUnavailable(
            "the testbed needs root (network namespaces, tc, nft, cgroups); "
            "run it with sudo, or use `edgemesh cluster up` for a local cluster without emulation"
        )
    missing = missing_tools()
    if missing:
        raise TestbedUnavailable(
            f"the testbed needs {', '.join(missing)}: apt-get install -y iproute2 nftables procps "
            "(or run ./scripts/setup as root)"
        )


def probe_netem() -> bool:
    """Does ``tc qdisc add ... netem`` work here? Tried on the loopback of a throw-away namespace."""
    ns = f"emprobe-{uuid.uuid4().hex[:8]}"
    try:
        if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode != 0:
            return False
        result = subprocess.run(
            ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
            capture_output=True,
        )
        return result.returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def probe_host(*, allow_netem: bool = True) -> HostCaps:
    return HostCaps(
        netem=allow_netem and probe_netem(),
        cgroups=CgroupLayout.detect(),
        turnserver=shutil.which("turnserver"),
    )
