"""nft rulesets that make a router namespace behave like a home NAT of a given type (RFC 4787).

Mapping and filtering, for UDP (what ICE uses; TCP always gets plain conntrack behaviour):

* ``full-cone``: endpoint-independent mapping *and* filtering. ``masquerade`` keeps the
  source port when it can, so one internal endpoint keeps one external port; a dynamic map
  learns ``external port -> internal addr . port`` on the way out, and any new inbound flow to
  that port is DNATed back to it, from whatever remote host.
* ``restricted`` (address-restricted cone): same mapping; inbound new flows are let in only
  from remote *addresses* the internal endpoint has sent to (a learned set of
  ``external port . remote address``), from any remote port.
* ``port-restricted``: plain conntrack: only the exact remote address and port may answer.
* ``symmetric``: ``masquerade random`` over a port range: every new destination gets a new
  external port, so a STUN-learned mapping is useless to other peers.
* ``none``: routed, not translated; the site's subnet is reachable from the internet.

Behind any NAT, new inbound flows that were not DNATed are dropped in ``forward``: a NAT is
also a firewall for its private hosts.
"""

from __future__ import annotations

import ipaddress

from edgemesh.testbed.scenario import NatType

# How long a learned mapping stays open without traffic, like a home router's UDP timeout.
MAPPING_TIMEOUT = "5m"
SYMMETRIC_PORTS = "20000-60000"


def nat_ruleset(table: str, nat: NatType, wan_if: str, lan_subnet: ipaddress.IPv4Network) -> str | None:
    """The ruleset text for ``nft -f -`` in a router namespace, or ``None`` for ``none``."""
    if nat is NatType.NONE:
        return None
    src = str(lan_subnet)
    masquerade = [f'oifname "{wan_if}" ip saddr {src} masquerade persistent']
    if nat is NatType.SYMMETRIC:
        # A port range needs a transport protocol; ICMP falls through to the plain rule.
        masquerade.insert(0, f'oifname "{wan_if}" ip saddr {src} meta l4proto {{ tcp, udp }} '
                             f"masquerade to :{SYMMETRIC_PORTS} random")
    learn: list[str] = []
    inbound: list[str] = []
    if nat in (NatType.FULL_CONE, NatType.RESTRICTED):
        # Runs after srcnat, so "udp sport" is already the external port.
        learn.append(f'oifname "{wan_if}" ct original ip saddr {src} meta l4proto udp '
                     f"update @mapping {{ udp sport : ct original ip saddr . ct original proto-src }}")
    if nat is NatType.RESTRICTED:
        learn.append(f'oifname "{wan_if}" ct original ip saddr {src} meta l4proto udp update @peers {{ udp sport . ip daddr }}')
        inbound.append(f'iifname "{wan_if}" ct state new udp dport . ip saddr @peers '
                       "dnat ip to udp dport map @mapping")
    elif nat is NatType.FULL_CONE:
        inbound.append(f'iifname "{wan_if}" ct state new meta l4proto udp dnat ip to udp dport map @mapping')

    lines = [f"table ip {table} {{"]
    if learn:
        lines += [
            "  map mapping {",
            "    type inet_service : ipv4_addr . inet_service",
            f"    flags dynamic, timeout; timeout {MAPPING_TIMEOUT};",
            "  }",
        ]
    if nat is NatType.RESTRICTED:
        lines += [
            "  set peers {",
            "    type inet_service . ipv4_addr",
            f"    flags dynamic, timeout; timeout {MAPPING_TIMEOUT};",
            "  }",
        ]
    lines += ["  chain prerouting {", "    type nat hook prerouting priority dstnat; policy accept;"]
    lines += [f"    {rule}" for rule in inbound]
    lines += ["  }", "  chain postrouting {", "    type nat hook postrouting priority srcnat; policy accept;"]
    lines += [f"    {rule}" for rule in masquerade]
    lines += ["  }"]
    if learn:
        lines += ["  chain learn {", "    type filter hook postrouting priority srcnat + 10; policy accept;"]
        lines += [f"    {rule}" for rule in learn]
        lines += ["  }"]
    lines += [
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        f'    iifname "{wan_if}" ct state new ct status & dnat == 0 drop',
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"
