"""Pure command builders: names, links, NAT rules, cgroups — no root needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgemesh.errors import ConfigError
from edgemesh.testbed.build import build_up
from edgemesh.testbed.cgroups import CgroupLayout, cgroup_steps
from edgemesh.testbed.host import HostCaps
from edgemesh.testbed.naming import Names, derive_prefix
from edgemesh.testbed.nat import nat_ruleset
from edgemesh.testbed.scenario import NatType, load_scenario
from edgemesh.testbed.steps import Kind, Run, Spawn, Write

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
V1 = CgroupLayout(1, Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup/cpu"))
V2 = CgroupLayout(2, Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup"))


def _steps(name: str, *, netem: bool, layout: CgroupLayout | None = V1):  # type: ignore[no-untyped-def]
    scenario = load_scenario(REPO / "emulation" / f"{name}.toml")
    return build_up(scenario, Names("tb1"), HostCaps(netem=netem, cgroups=layout, python="py", turnserver="turnserver"))


def _argvs(steps) -> list[tuple[str, ...]]:  # type: ignore[no-untyped-def]
    return [s.argv for s in steps if isinstance(s, Run)]


def test_prefix_and_interface_limits() -> None:
    assert len(derive_prefix("lan-4")) == 5 and derive_prefix("lan-4") == derive_prefix("lan-4")
    assert derive_prefix("lan-4") != derive_prefix("home-wan")
    with pytest.raises(ConfigError):
        Names("Bad!")
    with pytest.raises(ConfigError):
        Names("abcdef").ifname("x", 123456789)


def test_every_name_carries_the_prefix() -> None:
    for step in _steps("nat-mix", netem=False):
        if isinstance(step, Run) and step.argv[:3] == ("ip", "netns", "add"):
            assert step.argv[3].startswith("tb1-")
            assert step.creates is not None and step.creates.kind is Kind.NETNS
        if isinstance(step, Run) and "link" in step.argv and "add" in step.argv:
            name = step.argv[step.argv.index("add") + 1]
            assert name.startswith("tb1") and len(name) <= 15


def test_without_netem_delay_uses_taps_and_a_wire_and_nft_loss() -> None:
    steps = _steps("flaky", netem=False)
    argvs = _argvs(steps)
    assert any("tuntap" in a for a in argvs)
    assert not any("netem" in a for a in argvs)
    wires = [s for s in steps if isinstance(s, Spawn) and s.label.startswith("wire")]
    assert len(wires) == 4  # home's uplink + 3 access links; office's uplink is unshaped (veth)
    assert "--jitter-ms" in wires[0].argv and "--offload" not in wires[-1].argv  # lossy: no TSO
    rulesets = [s.stdin for s in steps if isinstance(s, Run) and s.stdin and "numgen" in s.stdin]
    assert len(rulesets) == 8  # both ends of 4 lossy links
    assert all("hook egress" in r and ("< 2000 drop" in r or "< 1000 drop" in r) for r in rulesets)


def test_with_netem_links_are_veth_with_netem() -> None:
    argvs = _argvs(_steps("flaky", netem=True))
    assert not any("tuntap" in a for a in argvs)
    netem = [a for a in argvs if "netem" in a]
    assert any(a[-5:] == ("delay", "10ms", "8ms", "loss", "2%") for a in netem)
    assert not any(isinstance(s, Spawn) and s.label.startswith("wire") for s in _steps("flaky", netem=True))


def test_bandwidth_is_htb_up_and_ifb_down() -> None:
    argvs = _argvs(_steps("home-wan", netem=False))
    rates = [a for a in argvs if "rate" in a]
    assert any("50mbit" in a for a in rates) and any("500mbit" in a for a in rates)
    assert any("ifb" in a for a in argvs)
    assert any("mirred" in a for a in argvs)


def test_nat_rulesets_per_type() -> None:
    import ipaddress

    net = ipaddress.IPv4Network("10.1.0.0/24")
    assert nat_ruleset("t", NatType.NONE, "w0", net) is None
    full = nat_ruleset("t", NatType.FULL_CONE, "w0", net) or ""
    assert "dnat ip to udp dport map @mapping" in full and "@peers" not in full
    restricted = nat_ruleset("t", NatType.RESTRICTED, "w0", net) or ""
    assert "udp dport . ip saddr @peers" in restricted
    port = nat_ruleset("t", NatType.PORT_RESTRICTED, "w0", net) or ""
    assert "dnat" not in port.split("chain forward")[0].replace("ct status & dnat", "")
    sym = nat_ruleset("t", NatType.SYMMETRIC, "w0", net) or ""
    assert "masquerade to :20000-60000 random" in sym
    for text in (full, restricted, port, sym):
        assert 'iifname "w0" ct state new ct status & dnat == 0 drop' in text


def test_cgroup_steps_v1_and_v2() -> None:
    scenario = load_scenario(REPO / "emulation" / "lan-4.toml")
    v1 = {s.path: s.value for s in cgroup_steps(V1, Names("tb1"), scenario.devices) if isinstance(s, Write)}
    assert v1["/sys/fs/cgroup/memory/edgemesh-tb1/dev1/memory.limit_in_bytes"] == str(2048 << 20)
    assert v1["/sys/fs/cgroup/cpu/edgemesh-tb1/dev1/cpu.cfs_quota_us"] == "5000"
    v2 = {s.path: s.value for s in cgroup_steps(V2, Names("tb1"), scenario.devices) if isinstance(s, Write)}
    assert v2["/sys/fs/cgroup/edgemesh-tb1/dev1/cpu.max"] == "5000 10000"
    assert v2["/sys/fs/cgroup/edgemesh-tb1/dev1/memory.max"] == str(2048 << 20)


def test_server_runs_coturn_in_its_namespace() -> None:
    spawns = [s for s in _steps("nat-mix", netem=False) if isinstance(s, Spawn) and s.label == "turnserver"]
    (turn,) = spawns
    assert turn.argv[:4] == ("ip", "netns", "exec", "tb1-srv")
    assert "--listening-ip=203.0.113.2" in turn.argv and "--user=edge:secret" in turn.argv


def test_dry_run_renders_every_step() -> None:
    rendered = [s.render() for s in _steps("nat-mix", netem=False)]
    assert rendered[0].startswith("mkdir -p ")
    assert any("<<'EOF'" in r for r in rendered)


def test_disk_read_cap_v1_and_v2() -> None:
    from edgemesh.testbed.cgroups import read_cap_bytes

    scenario = load_scenario(REPO / "emulation" / "lan-4.toml")
    cap = read_cap_bytes(scenario.device("dev1"))
    assert cap is not None and cap > 0  # the pi5 profile's read_mbyte_s, in bytes/s
    v1io = CgroupLayout(1, Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/blkio"))
    v1 = {s.path: s.value for s in cgroup_steps(v1io, Names("tb1"), scenario.devices, "254:0") if isinstance(s, Write)}
    assert v1["/sys/fs/cgroup/blkio/edgemesh-tb1/dev1/blkio.throttle.read_bps_device"] == f"254:0 {cap}"
    assert Path("/sys/fs/cgroup/blkio/edgemesh-tb1") in v1io.group_dirs(Names("tb1"))  # swept at teardown
    assert len(v1io.device_dirs(Names("tb1"), "dev1")) == 3  # every process of the device joins it
    v2io = CgroupLayout(2, Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup"))
    v2 = {s.path: s.value for s in cgroup_steps(v2io, Names("tb1"), scenario.devices, "8:0") if isinstance(s, Write)}
    assert v2["/sys/fs/cgroup/edgemesh-tb1/dev1/io.max"] == f"8:0 rbps={cap}"
    assert v2["/sys/fs/cgroup/edgemesh-tb1/cgroup.subtree_control"] == "+memory +cpu +io"
    # no disk under the state dir (tmpfs) or no controller: no cap, and nothing else changes
    assert not any("blkio" in s.path for s in cgroup_steps(v1io, Names("tb1"), scenario.devices, None) if isinstance(s, Write))
    assert cgroup_steps(V1, Names("tb1"), scenario.devices, "254:0") == cgroup_steps(V1, Names("tb1"), scenario.devices)


def test_backing_disk_and_disk_judgement() -> None:
    from edgemesh.testbed.cgroups import backing_disk
    from edgemesh.testbed.check import judge_disk

    assert backing_disk(Path("/proc/self")) is None  # not on a block device
    got = backing_disk(Path(__file__))
    assert got is None or (got.count(":") == 1 and all(p.isdigit() for p in got.split(":")))
    assert judge_disk("d", 45, 44.0, True).ok and judge_disk("d", 45, 20.0, True).ok
    assert not judge_disk("d", 45, 60.0, True).ok
    assert not judge_disk("d", 45, None, False).ok and "not enforced" in judge_disk("d", 45, None, False).problem
