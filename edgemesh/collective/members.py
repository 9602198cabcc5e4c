"""Who is in a collective group: key pairs and the peer list that every link layer takes.

Keys are X25519 pairs written z85-encoded (40 characters per 32-byte key), the same form a
node's identity derives for its CURVE key (edgemesh.identity.keys), so a member list needs no
conversion whichever link layer carries the group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from zmq.utils import z85

from edgemesh.collective.buffers import BufferPool


@dataclass(frozen=True)
class CurveKeys:
    """An X25519 key pair, both halves z85-encoded (40 bytes each), as ``zmq.curve_keypair()`` gives."""

    public: bytes
    secret: bytes

    @classmethod
    def generate(cls) -> CurveKeys:
        sk = X25519PrivateKey.generate()
        raw_secret = sk.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        raw_public = sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return cls(z85.encode(raw_public), z85.encode(raw_secret))

    def __repr__(self) -> str:  # never print the secret
        return f"CurveKeys(public={self.public!r})"


@dataclass(frozen=True)
class Peer:
    """Another member: where it listens and (unless plain) its z85 public key."""

    rank: int
    endpoint: str
    public_key: bytes | None = None


def peers_by_rank(rank: int, world_size: int, peers: Sequence[Peer], plain: bool) -> dict[int, Peer]:
    """The other ranks' peers by rank, checked: one per rank, and keys unless ``plain``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a group of {world_size}")
    by_rank = {p.rank: p for p in peers if p.rank != rank}
    missing = sorted(set(range(world_size)) - {rank} - set(by_rank))
    if missing:
        raise ValueError(f"no endpoint given for ranks {missing}")
    if not plain and any(p.public_key is None for p in by_rank.values()):
        raise ValueError("every peer of an encrypted group needs its public key")
    return by_rank


class Links(Protocol):
    """What the collectives need from a link layer (tcp_links.SecureLinks; bench.zmq_links.PeerLinks)."""

    rank: int
    world_size: int
    endpoint: str
    bytes_sent: int
    bytes_received: int
    retains_frames: bool  # True: send() may still read the caller's buffers after it returns
    buffers: BufferPool | None  # where accumulators should come from (recycled, no page faults)

    @property
    def plain(self) -> bool: ...

    @property
    def refused_connections(self) -> int: ...

    def join(self, rank: int, world_size: int, peers: Sequence[Peer], timeout: float) -> None: ...

    def send(self, peer: int, frames: Sequence[Any]) -> None: ...

    def recv(self, peer: int, deadline: float) -> list[Any]: ...

    def abort(self, reason: str) -> None: ...

    def close(self, *, abandon: bool = False) -> None: ...


__all__ = ["CurveKeys", "Links", "Peer"]
