"""Fixtures for root-only testbed tests: isolated run root, unique prefix, guaranteed teardown."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgemesh.testbed.cgroups import CgroupLayout
from edgemesh.testbed.host import HostCaps, missing_tools, probe_host
from edgemesh.testbed.lifecycle import up
from edgemesh.testbed.naming import Names
from edgemesh.testbed.scenario import Scenario, load_scenario, parse_scenario
from edgemesh.testbed.teardown import our_namespaces, teardown

REPO = Path(__file__).resolve().parents[2]
NODES = REPO / "nodes"


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "testbed tests need root (network namespaces, tc, nft, cgroups)"
    missing = missing_tools()
    if missing:
        return f"testbed tests need {', '.join(missing)} (apt-get install -y iproute2 nftables procps)"
    if not Path("/dev/net/tun").exists():
        return "testbed tests need /dev/net/tun"
    if CgroupLayout.detect() is None:
        return "testbed tests need cgroup memory+cpu controllers (v1 or v2)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _skip_reason()
    if reason is None:
        return
    for item in items:
        if "testbed" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def caps() -> HostCaps:
    return probe_host()


@pytest.fixture
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("tb-run")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def fresh_names(run_root: Path) -> Names:
    return Names("x" + secrets.token_hex(2), run_root)


class Bed:
    """A testbed that a test brought up; always torn down and checked for leftovers."""

    def __init__(self, scenario: Scenario, names: Names, caps: HostCaps) -> None:
        self.scenario = scenario
        self.names = names
        self.caps = caps
        self.state = up(scenario, names, caps)

    def close(self) -> None:
        teardown(self.names, self.caps.cgroups)
        assert our_namespaces(self.names) == [], "namespaces leaked"


@pytest.fixture
def bring_up(caps: HostCaps, run_root: Path) -> Iterator:
    beds: list[Bed] = []

    def make(source: str | Path) -> Bed:
        if isinstance(source, Path):
            scenario = load_scenario(source, nodes_dir=NODES)
        else:
            scenario = parse_scenario(source, file="inline.toml", nodes_dir=NODES)
        bed = Bed(scenario, fresh_names(run_root), caps)
        beds.append(bed)
        return bed

    yield make
    for bed in beds:
        bed.close()
