"""NAT types behave as specified (RFC 4787 mapping/filtering), measured with real UDP.

Remote hosts: ``pub1`` on a public site (198.18.x) and the wan namespace itself (203.0.113.1).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgemesh.testbed.addressing import WAN_GATEWAY, AddressPlan

pytestmark = pytest.mark.testbed

PEER = str(Path(__file__).with_name("natpeer.py"))
SCENARIO = """
name = "nat-test"
[sites.public]
nat = "none"
[sites.cone]
nat = "full-cone"
[sites.restr]
nat = "restricted"
[sites.portr]
nat = "port-restricted"
[sites.sym]
nat = "symmetric"
[devices.pub1]
site = "public"
[devices.c1]
site = "cone"
[devices.r1]
site = "restr"
[devices.p1]
site = "portr"
[devices.s1]
site = "sym"
"""
DEVICE_PORT = 40000
SERVER_PORT = 5000


class Net:
    def __init__(self, bed) -> None:  # type: ignore[no-untyped-def]
        self.bed = bed
        self.plan = AddressPlan(bed.scenario)
        self.procs: list[subprocess.Popen[str]] = []

    def ns_of(self, host: str) -> str:
        return self.bed.names.wan_ns if host == "wan" else self.bed.names.device_ns(host)

    def start(self, host: str, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns_of(host), sys.executable, PEER, *args],
                                stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        assert first in ("ready", "sent"), first
        return proc

    def result(self, proc: subprocess.Popen[str]) -> object:
        assert proc.stdout is not None
        out = proc.stdout.read()
        proc.wait(timeout=10)
        return json.loads(out.strip().splitlines()[-1])

    def send(self, host: str, src_port: int, dst: str, dst_port: int) -> None:
        subprocess.run(["ip", "netns", "exec", self.ns_of(host), sys.executable, PEER, "send",
                        str(src_port), dst, str(dst_port)], check=True, timeout=10)

    def mapping(self, device: str) -> tuple[subprocess.Popen[str], tuple[str, int]]:
        """The device sends to pub1; returns its still-listening socket and the mapping pub1 saw."""
        pub = str(self.plan.device_address("pub1"))
        listener = self.start("pub1", "listen", str(SERVER_PORT), "5")
        punch = self.start(device, "punch", str(DEVICE_PORT), "3", pub, str(SERVER_PORT))
        seen = self.result(listener)
        assert isinstance(seen, dict), f"{device}'s packet never reached pub1"
        ip, port = seen["from"]
        return punch, (ip, port)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def net(caps, tmp_path_factory):  # type: ignore[no-untyped-def]
    from .conftest import NODES, Bed, fresh_names
    from edgemesh.testbed.scenario import parse_scenario

    bed = Bed(parse_scenario(SCENARIO, file="nat-test.toml", nodes_dir=NODES),
              fresh_names(tmp_path_factory.mktemp("nat-run")), caps)
    n = Net(bed)
    yield n
    n.close()
    bed.close()


def test_full_cone_accepts_a_new_remote_host(net: Net) -> None:
    punch, (ip, port) = net.mapping("c1")
    assert ip == str(net.plan.router_wan("cone"))
    net.send("wan", 6000, ip, port)  # a host the device never talked to
    assert [str(WAN_GATEWAY), 6000] in net.result(punch)


def test_restricted_accepts_known_address_only(net: Net) -> None:
    punch, (ip, port) = net.mapping("r1")
    net.send("wan", 6000, ip, port)  # new address: filtered
    net.send("pub1", SERVER_PORT + 1, ip, port)  # known address, new port: allowed
    got = net.result(punch)
    assert [str(WAN_GATEWAY), 6000] not in got
    assert [str(net.plan.device_address("pub1")), SERVER_PORT + 1] in got


def test_port_restricted_accepts_known_address_and_port_only(net: Net) -> None:
    punch, (ip, port) = net.mapping("p1")
    pub = str(net.plan.device_address("pub1"))
    net.send("wan", 6000, ip, port)
    net.send("pub1", SERVER_PORT + 1, ip, port)
    net.send("pub1", SERVER_PORT, ip, port)  # the exact remote endpoint: allowed
    got = net.result(punch)
    assert got == [[pub, SERVER_PORT]]


def test_symmetric_uses_a_new_port_per_destination(net: Net) -> None:
    pub = str(net.plan.device_address("pub1"))
    a = net.start("pub1", "listen", str(SERVER_PORT), "5")
    b = net.start("wan", "listen", str(SERVER_PORT), "5")
    punch = net.start("s1", "punch", str(DEVICE_PORT), "1", pub, str(SERVER_PORT), str(WAN_GATEWAY), str(SERVER_PORT))
    seen_a, seen_b = net.result(a), net.result(b)
    net.result(punch)
    assert isinstance(seen_a, dict) and isinstance(seen_b, dict)
    assert seen_a["from"][0] == seen_b["from"][0] == str(net.plan.router_wan("sym"))
    assert seen_a["from"][1] != seen_b["from"][1], "same external port for two destinations"
    # ... while the cone NATs keep one port for both (endpoint-independent mapping).
    a = net.start("pub1", "listen", str(SERVER_PORT), "5")
    b = net.start("wan", "listen", str(SERVER_PORT), "5")
    punch = net.start("r1", "punch", str(DEVICE_PORT + 1), "1", pub, str(SERVER_PORT), str(WAN_GATEWAY), str(SERVER_PORT))
    seen_a, seen_b = net.result(a), net.result(b)
    net.result(punch)
    assert isinstance(seen_a, dict) and isinstance(seen_b, dict)
    assert seen_a["from"][1] == seen_b["from"][1]
