"""``tcp://HOST:PORT`` endpoints, written and read in one place (IPv6 hosts go in brackets)."""

from __future__ import annotations


def tcp_endpoint(host: str, port: int | str) -> str:
    """``port`` may be ``"*"`` (zmq: any free port)."""
    if ":" in host and not host.startswith("["):
        return f"tcp://[{host}]:{port}"
    return f"tcp://{host}:{port}"


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``(host, port)`` of ``tcp://HOST:PORT``; host ``*`` is ``0.0.0.0`` and port ``*`` is 0.
    ``ValueError`` for anything else."""
    if not endpoint.startswith("tcp://"):
        raise ValueError(f"endpoint must look like tcp://HOST:PORT, got {endpoint!r}")
    host, sep, port = endpoint[len("tcp://"):].rpartition(":")
    if not sep or not host:
        raise ValueError(f"endpoint must look like tcp://HOST:PORT, got {endpoint!r}")
    host = host.strip("[]")
    if host == "*":
        host = "0.0.0.0"
    try:
        return host, 0 if port == "*" else int(port)
    except ValueError:
        raise ValueError(f"bad port in endpoint {endpoint!r}") from None


def endpoint_host(endpoint: str) -> str:
    """The host of an endpoint, leniently (a record's address, a daemon's control endpoint):
    never raises; a string with no port is taken as a host."""
    return endpoint.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
