"""Scenario validation: shipped files load; mistakes name the key and the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgemesh.errors import ConfigError
from edgemesh.testbed.scenario import NatType, load_scenario, parse_scenario

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
NODES = REPO / "nodes"


@pytest.mark.parametrize("name", ["lan-4", "home-wan", "nat-mix", "flaky"])
def test_shipped_scenarios_load(name: str) -> None:
    s = load_scenario(REPO / "emulation" / f"{name}.toml")
    assert s.devices and s.sites


def test_lan4_numbers() -> None:
    s = load_scenario(REPO / "emulation" / "lan-4.toml")
    assert [d.name for d in s.devices] == ["dev1", "dev2", "dev3", "dev4"]
    assert all(d.cpus == 0.5 and d.memory_mib == 2048 for d in s.devices)
    assert all(d.link.up_mbit == 300 and d.link.delay_ms == 0.5 for d in s.devices)


def test_nat_mix_has_every_nat_type_and_a_server() -> None:
    s = load_scenario(REPO / "emulation" / "nat-mix.toml")
    assert {site.nat for site in s.sites} == set(NatType)
    assert s.server is not None


def _err(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_scenario(text, file="x.toml", nodes_dir=NODES)
    return str(info.value)


def test_bad_nat_type_names_key_and_line() -> None:
    msg = _err('[sites.home]\nsubnet = "10.1.0.0/24"\nnat = "fullcone"\n[devices.a]\n')
    assert msg.startswith("x.toml:3: sites.home.nat:") and "full-cone" in msg


def test_unknown_key_is_reported_with_line() -> None:
    msg = _err('[sites.home]\n[devices.a]\n[devices.a.link]\ndelay = 5\n')
    assert msg.startswith("x.toml:4: devices.a.link.delay: unknown key") and "delay_ms" in msg


def test_negative_loss_and_jitter_above_delay() -> None:
    assert "between 0 and 100" in _err('[sites.h]\n[devices.a]\n[devices.a.link]\nloss_pct = 120\n')
    assert "must not exceed delay_ms" in _err('[sites.h]\n[devices.a]\n[devices.a.link]\ndelay_ms = 1\njitter_ms = 2\n')


def test_unknown_site_profile_and_overlaps() -> None:
    assert "unknown site 'x'" in _err('[sites.h]\n[devices.a]\nsite = "x"\n')
    assert "unknown device profile 'nope'" in _err('[sites.h]\n[devices.a]\nprofile = "nope"\n')
    assert "overlaps site" in _err('[sites.a]\nsubnet = "10.0.0.0/16"\n[sites.b]\nsubnet = "10.0.1.0/24"\n[devices.d]\nsite = "a"\n')
    assert "emulated internet" in _err('[sites.a]\nsubnet = "203.0.113.0/25"\n[devices.d]\n')


def test_layering_profile_defaults_device() -> None:
    s = parse_scenario(
        '[defaults]\nprofile = "pi4"\n[defaults.link]\nmbit = 40\n'
        '[sites.h]\n[devices.a]\n[devices.b]\nmemory_mib = 512\n[devices.b.link]\ndown_mbit = 10\n',
        file="x.toml", nodes_dir=NODES)
    a, b = s.devices
    assert a.memory_mib == 4096 and a.cpus == 0.7  # from nodes/pi4.toml
    assert a.link.up_mbit == 40 and a.link.delay_ms == 1.0  # scenario default over profile
    assert b.memory_mib == 512 and b.link.down_mbit == 10 and b.link.up_mbit == 40


def test_device_names_must_fit_interfaces() -> None:
    assert "1-16 characters" in _err('[sites.h]\n[devices.Dev_1]\n')
