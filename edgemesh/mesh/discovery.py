"""LAN discovery with mDNS/DNS-SD (zeroconf).

Members announce ``_edgemesh._tcp.local.`` with the cluster id, node id, public key and join
port — never the secret. What a browser finds is only a hint: a join still needs the token's
secret, and the joiner checks the server's proof of that secret, bound to its link, before
revealing anything (an impostor announcing its own key cannot pass on a real member's answers).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import socket
from dataclasses import dataclass

from edgemesh.identity.keys import NodeKey

log = logging.getLogger(__name__)

SERVICE = "_edgemesh._tcp.local."


@dataclass(frozen=True)
class Announcement:
    cluster_id: str
    node_id: str
    name: str
    join_endpoint: str
    key: bytes


async def announce(cluster_id: str, key: NodeKey, name: str, host: str, join_port: int) -> None:
    """Announce until cancelled. Multicast may be unavailable (containers): log and give up."""
    from zeroconf import ServiceInfo
    from zeroconf.asyncio import AsyncZeroconf

    info = ServiceInfo(
        SERVICE,
        f"{key.node_id}.{SERVICE}",
        addresses=[socket.inet_aton(host)] if _is_ipv4(host) else [],
        port=join_port,
        properties={"cluster": cluster_id, "node": key.node_id, "name": name[:60],
                    "key": base64.b64encode(key.sign_public).decode()},
    )
    try:
        zc = AsyncZeroconf(interfaces=[host] if _is_ipv4(host) and host != "127.0.0.1" else None)
        await zc.async_register_service(info)
    except Exception as exc:  # noqa: BLE001 — any mDNS failure only disables discovery
        log.info("LAN discovery disabled: %s", exc)
        return
    try:
        await asyncio.Event().wait()
    finally:
        try:
            await asyncio.wait_for(zc.async_unregister_service(info), 1.0)
        except Exception:  # noqa: BLE001
            pass
        await zc.async_close()


async def browse(seconds: float = 2.0) -> list[Announcement]:
    """Everything announced on the LAN within ``seconds``."""
    from zeroconf import ServiceStateChange
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    names: set[str] = set()

    def on_change(zeroconf: object, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Added:
            names.add(name)

    zc = AsyncZeroconf()
    browser = AsyncServiceBrowser(zc.zeroconf, [SERVICE], handlers=[on_change])
    try:
        await asyncio.sleep(seconds)
        found = []
        for name in sorted(names):
            info = AsyncServiceInfo(SERVICE, name)
            if not await info.async_request(zc.zeroconf, 1000):
                continue
            ann = _parse(info)
            if ann:
                found.append(ann)
        return found
    finally:
        await browser.async_cancel()
        await zc.async_close()


def _parse(info: object) -> Announcement | None:
    try:
        props = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}  # type: ignore[attr-defined]
        addrs = info.parsed_addresses()  # type: ignore[attr-defined]
        key = base64.b64decode(props["key"])
        if not addrs or len(key) != 32:
            return None
        return Announcement(props["cluster"], props["node"], props.get("name", ""),
                            f"tcp://{addrs[0]}:{info.port}", key)  # type: ignore[attr-defined]
    except (KeyError, ValueError, UnicodeDecodeError):
        return None


def _is_ipv4(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv4Address)
    except ValueError:
        return False
