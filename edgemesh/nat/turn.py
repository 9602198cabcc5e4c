"""TURN credentials from the cluster secret (the TURN REST scheme) and a coturn beside a node.

coturn's ``--use-auth-secret`` checks ``password == base64(HMAC-SHA1(secret, username))`` with
``username = "<expiry unix time>:<node id>"``, so members mint their own short-lived
credentials and nothing long-lived is ever handed out. The shared secret is derived from the
cluster secret, so every member (and only members) can mint them, and rotating the cluster
rotates TURN too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass
from pathlib import Path

TURN_CONTEXT = b"edgemesh-turn-v1"
CREDENTIAL_TTL = 24 * 3600
TURN_PORT = 3478
RELAY_PORTS = (49152, 65535)
REALM = "edgemesh"
# Relays only towards public addresses: a TURN server must not become a door into the LAN it
# sits on (or into the host itself).
DENIED_PEER_RANGES = ("0.0.0.0-0.255.255.255", "10.0.0.0-10.255.255.255", "100.64.0.0-100.127.255.255",
                      "127.0.0.0-127.255.255.255", "169.254.0.0-169.254.255.255",
                      "172.16.0.0-172.31.255.255", "192.168.0.0-192.168.255.255")


def turn_secret(cluster_secret: bytes) -> str:
    """coturn's static-auth-secret for a cluster (hex; never the cluster secret itself)."""
    return hmac.new(cluster_secret, TURN_CONTEXT, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class TurnCredential:
    username: str
    password: str


def rest_credential(secret: str, node_id: str, now: float | None = None, ttl: int = CREDENTIAL_TTL) -> TurnCredential:
    expiry = int((now if now is not None else time.time()) + ttl)
    username = f"{expiry}:{node_id}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return TurnCredential(username, base64.b64encode(digest).decode())


def coturn_config(listen: str, secret: str, log_file: Path, port: int = TURN_PORT,
                  relay_ports: tuple[int, int] = RELAY_PORTS) -> str:
    """A turnserver.conf (written 0600: it holds the secret, which must not sit in argv)."""
    lines = [
        f"listening-ip={listen}", f"relay-ip={listen}", f"listening-port={port}",
        f"min-port={relay_ports[0]}", f"max-port={relay_ports[1]}",
        "use-auth-secret", f"static-auth-secret={secret}", f"realm={REALM}",
        "fingerprint", "no-cli", "no-tls", "no-dtls", "no-multicast-peers",
        f"log-file={log_file}", "simple-log", "no-stdout-log",
        *(f"denied-peer-ip={r}" for r in DENIED_PEER_RANGES),
    ]
    return "\n".join(lines) + "\n"


def coturn_argv(binary: str, config: Path) -> list[str]:
    return [binary, "-n", "-c", str(config)]
