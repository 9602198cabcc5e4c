"""The address plan: which IP every namespace gets. Pure, so builders, ``check`` and tests agree.

The emulated internet is 203.0.113.0/24 (TEST-NET-3) on a bridge in the ``wan`` namespace:
``.1`` is the wan namespace itself (the "internet" router), ``.2`` the STUN/TURN server,
``.10 + i`` the WAN side of site i's router. Inside a site the router is the first host of
the subnet and devices follow in scenario order.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from edgemesh.testbed.scenario import WAN_SUBNET, Scenario

WAN_GATEWAY = ipaddress.IPv4Address("203.0.113.1")
SERVER_ADDRESS = ipaddress.IPv4Address("203.0.113.2")
# MACHINE.md: without a default route in the wan namespace, relayed ICE loops on 438/400.
WAN_DEAD_END = ipaddress.IPv4Address("203.0.113.254")
_ROUTER_BASE = 10


@dataclass(frozen=True)
class AddressPlan:
    scenario: Scenario

    @property
    def wan_prefixlen(self) -> int:
        return WAN_SUBNET.prefixlen

    def site_index(self, site: str) -> int:
        return [s.name for s in self.scenario.sites].index(site)

    def router_wan(self, site: str) -> ipaddress.IPv4Address:
        return WAN_SUBNET.network_address + _ROUTER_BASE + self.site_index(site)

    def router_lan(self, site: str) -> ipaddress.IPv4Address:
        return self.scenario.site(site).subnet.network_address + 1

    def device_address(self, device: str) -> ipaddress.IPv4Address:
        dev = self.scenario.device(device)
        position = [d.name for d in self.scenario.devices_in(dev.site)].index(device)
        return self.scenario.site(dev.site).subnet.network_address + 2 + position

    def public_address(self, device: str) -> ipaddress.IPv4Address:
        """What the internet sees as the device's address (its router's, behind a NAT)."""
        dev = self.scenario.device(device)
        if self.scenario.site(dev.site).nat.value == "none":
            return self.device_address(device)
        return self.router_wan(dev.site)
