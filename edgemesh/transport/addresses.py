"""Which of this machine's addresses to hand to a peer, for a service listening on a wildcard.

A daemon started with the default ``--host 0.0.0.0`` listens everywhere, but an endpoint given
to another member must name an address that member can reach: never loopback for a member on
another machine (it would dial itself), and on a multi-homed machine the address on the path
towards that member. The kernel's route lookup answers the latter without sending a packet: a
UDP socket ``connect``ed to the peer has the source address the kernel would use.
"""

from __future__ import annotations

import ipaddress
import socket

WILDCARDS = ("0.0.0.0", "::", "", "*")


def is_wildcard(host: str) -> bool:
    return host in WILDCARDS


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def local_addresses() -> set[str]:
    """Every address of this machine's interfaces (loopback included)."""
    import psutil

    out = {"127.0.0.1", "::1"}
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                out.add(a.address.split("%", 1)[0])
    return out


def source_address_towards(host: str) -> str | None:
    """The local address the kernel would send from to reach ``host``; None without a route."""
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))  # UDP connect: a route lookup, nothing is sent
            return str(s.getsockname()[0])
    except OSError:
        return None


def address_for_peer(peer_host: str, listen_host: str, advertise: str, advertise_explicit: bool,
                     mine: set[str] | None = None) -> str:
    """The address of ours that a peer at ``peer_host`` should dial for a service bound on
    ``listen_host``. A peer on this machine may use loopback; a peer elsewhere gets the address
    we were told to advertise, else the one on the route towards it, else the detected one.
    Raises ``ValueError`` when the service listens on loopback only and the peer is elsewhere."""
    mine = local_addresses() if mine is None else mine
    same_machine = is_loopback(peer_host) or peer_host.strip("[]") in mine
    if not is_wildcard(listen_host):
        if is_loopback(listen_host) and not same_machine:
            raise ValueError(f"this node listens on {listen_host} only, which {peer_host} cannot reach "
                             "(start it with --host 0.0.0.0 or its LAN address)")
        return listen_host
    if same_machine:
        return "::1" if ":" in listen_host else "127.0.0.1"
    if advertise_explicit:
        return advertise
    routed = source_address_towards(peer_host)
    if routed is not None and not is_loopback(routed):
        return routed
    return advertise


# Bridges that container and VM tools add: their addresses are private but reach no other device.
_VIRTUAL_PREFIXES = ("docker", "br-", "virbr", "veth", "cni", "flannel", "podman", "lxcbr", "vmnet", "vboxnet")
_NO_ROUTE_PROBE = "192.0.2.1"  # TEST-NET-1: only the route table is consulted, nothing is sent


def detect_host() -> str:
    """The address this machine most likely has on the LAN: the one its default route leaves
    from; without a default route (an isolated LAN), the first private address of a physical-
    looking interface; else loopback."""
    routed = source_address_towards(_NO_ROUTE_PROBE)
    if routed is not None and not is_loopback(routed):
        return routed
    import psutil

    found = []
    for name, addrs in psutil.net_if_addrs().items():
        if name.startswith(_VIRTUAL_PREFIXES):
            continue
        for a in addrs:
            if a.family == socket.AF_INET:
                ip = ipaddress.ip_address(a.address)
                if not ip.is_loopback and not ip.is_link_local:
                    found.append(ip)
    found.sort(key=lambda ip: (not ip.is_private, ip))
    return str(found[0]) if found else "127.0.0.1"
