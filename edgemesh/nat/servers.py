"""STUN/TURN server addresses: parsing, and where a node learns them. Sans-IO.

URLs follow RFC 7064/7065 (``stun:host[:port]``, ``turn:host[:port]``), with optional static
credentials for an existing TURN server: ``turn:user:password@host:port``. Credential-less
TURN URLs use TURN REST credentials minted from the cluster secret (see ``turn``).

A node that runs coturn publishes ``stun:…`` and ``turn:…`` (never credentials) among the
addresses of its signed member record, so every member learns the cluster's servers from the
replicated view; servers given on the command line are used as well.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from edgemesh.errors import ConfigError

_URL = re.compile(r"^(?P<scheme>stun|turn):(?:(?P<user>[^:@/]+):(?P<password>[^@/]+)@)?"
                  r"(?P<host>[A-Za-z0-9.\-]+|\[[0-9a-fA-F:]+\])(?::(?P<port>\d{1,5}))?$")
DEFAULT_PORT = 3478


@dataclass(frozen=True)
class IceServer:
    scheme: str  # stun | turn
    host: str
    port: int = DEFAULT_PORT
    username: str | None = None  # static credentials (existing servers); None: TURN REST
    password: str | None = None

    @property
    def public_url(self) -> str:
        """The URL without credentials: what may be published to the cluster."""
        return f"{self.scheme}:{self.host}:{self.port}"


def parse_server(url: str) -> IceServer:
    m = _URL.match(url.strip())
    if not m:
        raise ConfigError(f"{url!r} is not a STUN/TURN URL (stun:HOST[:PORT] or turn:[USER:PASS@]HOST[:PORT])")
    port = int(m["port"] or DEFAULT_PORT)
    if not 0 < port < 65536:
        raise ConfigError(f"{url!r}: port out of range")
    if m["scheme"] == "stun" and m["user"]:
        raise ConfigError(f"{url!r}: STUN servers take no credentials")
    return IceServer(m["scheme"], m["host"], port, m["user"], m["password"])


def is_server_url(address: str) -> bool:
    return address.startswith(("stun:", "turn:"))


def servers_from(local: Iterable[str], published: Iterable[str]) -> tuple[IceServer | None, IceServer | None]:
    """The STUN and TURN server to use: local settings first, then what members publish.

    aioice uses one of each; bad published entries are skipped (a member's typo must not stop
    everyone else), bad local ones raise.
    """
    stun: IceServer | None = None
    turn: IceServer | None = None
    candidates = [parse_server(u) for u in local]
    for url in published:
        try:
            candidates.append(parse_server(url))
        except ConfigError:
            continue
    for s in candidates:
        if s.scheme == "stun" and stun is None:
            stun = s
        elif s.scheme == "turn" and turn is None:
            turn = s
    if stun is None and turn is not None:
        stun = IceServer("stun", turn.host, turn.port)  # every TURN server also answers STUN
    return stun, turn
