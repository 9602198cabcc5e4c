"""Scenario -> the full list of steps that bring a testbed up. Pure: no I/O, no root needed.

Topology (MACHINE.md's recipe): a ``wan`` namespace with a bridge is the internet; every site
has a router namespace (WAN end on that bridge, LAN bridge for its devices, nft NAT rules);
every device has its own namespace with one access link to its router's LAN bridge; an
optional server namespace on the internet runs coturn. Links are veth pairs, or TAP pairs
joined by the userspace delay wire when the link needs delay and the host has no netem.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgemesh.testbed.addressing import SERVER_ADDRESS, WAN_DEAD_END, WAN_GATEWAY, AddressPlan
from edgemesh.testbed.cgroups import backing_disk, cgroup_steps
from edgemesh.testbed.host import HostCaps, TestbedUnavailable
from edgemesh.testbed.naming import Names
from edgemesh.testbed.nat import nat_ruleset
from edgemesh.testbed.scenario import LinkSpec, NatType, Scenario, Server
from edgemesh.testbed.shaping import End, LinkPlan, create_steps, shaping_steps, wire_spawn
from edgemesh.testbed.steps import Kind, MakeDir, Resource, Run, Spawn, Step

TURN_MIN_PORT = 49152
TURN_MAX_PORT = 49999


@dataclass(frozen=True)
class Layout:
    """Everything a scenario turns into, with names and addresses resolved."""

    scenario: Scenario
    names: Names
    addresses: AddressPlan
    links: tuple[LinkPlan, ...]

    def link(self, label: str) -> LinkPlan:
        for link in self.links:
            if link.label == label:
                return link
        raise KeyError(label)


def access_label(device: str) -> str:
    return f"{device}<->lan"


def uplink_label(site: str) -> str:
    return f"{site}<->wan"


def layout(scenario: Scenario, names: Names, caps: HostCaps) -> Layout:
    addresses = AddressPlan(scenario)
    links: list[LinkPlan] = []
    for s, site in enumerate(scenario.sites):
        links.append(LinkPlan(
            inner=End(names.router_ns(site.name), names.site_wan_if(s)),
            outer=End(names.wan_ns, names.site_wan_peer_if(s)),
            spec=site.uplink, ifb=names.site_ifb(s), netem=caps.netem, label=uplink_label(site.name),
        ))
    for d, dev in enumerate(scenario.devices):
        links.append(LinkPlan(
            inner=End(names.device_ns(dev.name), names.dev_if(d)),
            outer=End(names.router_ns(dev.site), names.dev_peer_if(d)),
            spec=dev.link, ifb=names.dev_ifb(d), netem=caps.netem, label=access_label(dev.name),
        ))
    return Layout(scenario, names, addresses, tuple(links))


def _netns_steps(ns: str, *, forward: bool) -> list[Step]:
    stage = "namespaces"
    sysctls = ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
    if forward:
        sysctls.append("net.ipv4.ip_forward=1")
    return [
        Run(("ip", "netns", "add", ns), stage, Resource(Kind.NETNS, ns)),
        Run(("ip", "-n", ns, "link", "set", "lo", "up"), stage),
        # IPv6 off: router solicitations and DAD would otherwise trickle over every link and
        # show up as noise in loss and throughput measurements.
        Run(("ip", "netns", "exec", ns, "sysctl", "-qw", *sysctls), stage),
    ]


def turnserver_argv(binary: str, server: Server, address: str, log_dir: str) -> tuple[str, ...]:
    argv = [
        binary, "-n", "--no-cli", "--no-tls", "--no-dtls",
        f"--listening-ip={address}", f"--relay-ip={address}",
        f"--min-port={TURN_MIN_PORT}", f"--max-port={TURN_MAX_PORT}",
        "--fingerprint", f"--realm={server.realm}",
        # Relays must go via the public side, like a real TURN server on the internet.
        "--denied-peer-ip=10.0.0.0-10.255.255.255",
        f"--log-file={log_dir}/turnserver.log", "--simple-log", "--no-stdout-log",
    ]
    if server.turn:
        argv += ["--lt-cred-mech", f"--user={server.user}:{server.password}"]
    else:
        argv += ["--stun-only"]
    return tuple(argv)


def build_up(scenario: Scenario, names: Names, caps: HostCaps) -> list[Step]:
    lay = layout(scenario, names, caps)
    addr = lay.addresses
    wan_len = addr.wan_prefixlen
    steps: list[Step] = []

    steps.append(MakeDir(str(names.run_dir), "files", Resource(Kind.DIR, str(names.run_dir))))
    for dev in scenario.devices:
        steps.append(MakeDir(str(names.device_dir(dev.name)), "files"))

    # namespaces
    steps += _netns_steps(names.wan_ns, forward=True)
    if scenario.server is not None:
        steps += _netns_steps(names.server_ns, forward=False)
    for site in scenario.sites:
        steps += _netns_steps(names.router_ns(site.name), forward=True)
    for dev in scenario.devices:
        steps += _netns_steps(names.device_ns(dev.name), forward=False)

    # the internet: one bridge, the wan namespace as its router
    stage = "internet"
    wan = names.wan_ns
    br = names.wan_bridge
    steps += [
        Run(("ip", "-n", wan, "link", "add", br, "type", "bridge"), stage),
        Run(("ip", "-n", wan, "addr", "add", f"{WAN_GATEWAY}/{wan_len}", "dev", br), stage),
        Run(("ip", "-n", wan, "link", "set", br, "up"), stage),
        Run(("ip", "-n", wan, "route", "add", "default", "via", str(WAN_DEAD_END)), stage),
    ]
    if scenario.server is not None:
        srv = names.server_ns
        steps += [
            Run(("ip", "-n", srv, "link", "add", names.server_if, "type", "veth",
                 "peer", "name", names.server_peer_if, "netns", wan), stage),
            Run(("ip", "-n", wan, "link", "set", names.server_peer_if, "master", br, "up"), stage),
            Run(("ip", "-n", srv, "addr", "add", f"{SERVER_ADDRESS}/{wan_len}", "dev", names.server_if), stage),
            Run(("ip", "-n", srv, "link", "set", names.server_if, "up"), stage),
            Run(("ip", "-n", srv, "route", "add", "default", "via", str(WAN_GATEWAY)), stage),
        ]

    # sites: router, uplink, LAN bridge, NAT
    for site in scenario.sites:
        stage = f"site {site.name}"
        rns = names.router_ns(site.name)
        up = lay.link(uplink_label(site.name))
        steps += create_steps(up, stage)
        steps += [
            Run(("ip", "-n", wan, "link", "set", up.outer.ifname, "master", br, "up"), stage),
            Run(("ip", "-n", rns, "addr", "add", f"{addr.router_wan(site.name)}/{wan_len}", "dev", up.inner.ifname), stage),
            Run(("ip", "-n", rns, "link", "set", up.inner.ifname, "up"), stage),
            Run(("ip", "-n", rns, "route", "add", "default", "via", str(WAN_GATEWAY)), stage),
            Run(("ip", "-n", rns, "link", "add", names.lan_bridge, "type", "bridge"), stage),
            Run(("ip", "-n", rns, "addr", "add", f"{addr.router_lan(site.name)}/{site.subnet.prefixlen}",
                 "dev", names.lan_bridge), stage),
            Run(("ip", "-n", rns, "link", "set", names.lan_bridge, "up"), stage),
        ]
        if site.nat is NatType.NONE:
            # A public site: the internet routes its subnet to the router.
            steps.append(Run(("ip", "-n", wan, "route", "add", str(site.subnet), "via", str(addr.router_wan(site.name))), stage))
        ruleset = nat_ruleset(names.nat_table, site.nat, up.inner.ifname, site.subnet)
        if ruleset is not None:
            steps.append(Run(("ip", "netns", "exec", rns, "nft", "-f", "-"), stage, stdin=ruleset))

    # devices: access link to the router's LAN bridge
    for dev in scenario.devices:
        stage = f"device {dev.name}"
        dns = names.device_ns(dev.name)
        rns = names.router_ns(dev.site)
        site = scenario.site(dev.site)
        link = lay.link(access_label(dev.name))
        steps += create_steps(link, stage)
        steps += [
            Run(("ip", "-n", rns, "link", "set", link.outer.ifname, "master", names.lan_bridge, "up"), stage),
            Run(("ip", "-n", dns, "addr", "add", f"{addr.device_address(dev.name)}/{site.subnet.prefixlen}",
                 "dev", link.inner.ifname), stage),
            Run(("ip", "-n", dns, "link", "set", link.inner.ifname, "up"), stage),
            Run(("ip", "-n", dns, "route", "add", "default", "via", str(addr.router_lan(dev.site))), stage),
        ]

    # shaping, once every interface exists and is up
    for link in lay.links:
        steps += shaping_steps(link, names.loss_table, f"shaping {link.label}")

    if caps.cgroups is not None:
        steps += cgroup_steps(caps.cgroups, names, scenario.devices, backing_disk(names.run_root))

    # helpers last: the delay wires carry frames only once both TAPs are configured
    for link in lay.links:
        if link.uses_wire:
            log = str(names.run_dir / f"wire-{link.label.replace('<->', '-')}.log")
            steps.append(wire_spawn(link, caps.python, "delay wires", log))
    if scenario.server is not None:
        if caps.turnserver is None:
            raise TestbedUnavailable("the scenario has a [server] but coturn's turnserver is not installed: apt-get install -y coturn")
        argv = ("ip", "netns", "exec", names.server_ns,
                *turnserver_argv(caps.turnserver, scenario.server, str(SERVER_ADDRESS), str(names.run_dir)))
        steps.append(Spawn(argv, label="turnserver", stage="stun/turn", ready=None, settle_s=0.5,
                           log=str(names.run_dir / "turnserver.out")))
    return steps


def link_spec_summary(spec: LinkSpec) -> str:
    """One line for tables: ``300/300 Mbit/s, 0.5 ms ±0.1, 2% loss``."""

    def mbit(value: float | None) -> str:
        return "-" if value is None else f"{value:g}"

    parts = []
    if spec.up_mbit is not None or spec.down_mbit is not None:
        parts.append(f"{mbit(spec.up_mbit)}/{mbit(spec.down_mbit)} Mbit/s")
    if spec.needs_delay:
        parts.append(f"{spec.delay_ms:g} ms" + (f" ±{spec.jitter_ms:g}" if spec.jitter_ms else ""))
    if spec.loss_pct:
        parts.append(f"{spec.loss_pct:g}% loss")
    return ", ".join(parts) or "unshaped"
