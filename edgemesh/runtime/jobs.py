"""A tensor-parallel job as one worker sees it: what to fetch, what to compute, whom to trust.

It arrives over the mesh (`llm.start`) from whichever member launched the model, so every field
is checked here before the daemon acts on it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from edgemesh.collective.costmodel import MAX_HOP_S, MAX_LINK_BPS, MIN_LINK_BPS
from edgemesh.errors import ProtocolError
from edgemesh.wire.schema import body_map, maybe, need

_JOB_RE = re.compile(r"^[a-f0-9]{8,32}$")
_SHA_RE = re.compile(r"^[a-f0-9]{64}$")
MAX_FILES = 4096
ALGORITHMS = ("auto", "star", "chunked_star", "ring", "direct")
COMPRESSIONS = (None, "float16", "bfloat16", "q8_0")


@dataclass(frozen=True)
class JobFile:
    block: str
    sha256: str
    nbytes: int


@dataclass(frozen=True)
class JobSpec:
    job: str
    rank: int
    world: int
    model: str
    config: dict[str, Any]
    specs: list[dict[str, Any]]
    files: tuple[JobFile, ...]
    server: str  # the launcher's job endpoint (tcp://host:port)
    server_key: bytes  # ed25519 key of the launching node
    keys: tuple[bytes, ...]  # ed25519 key of every rank, in rank order
    max_seq_len: int
    timeout: float
    algorithm: str = "auto"
    compression: str | None = None
    threads: int = 0  # torch threads for this rank; 0 = torch's default (all cores)
    cpu_slot: tuple[int, int] | None = None  # (i, n): pin to the i-th of n equal parts of the cores
    window: int = 0  # weight blocks resident at once, streamed from disk (weights/window.py); 0 = all in memory
    link_cost: tuple[float, float] | None = None  # the group's (a, b) for the cost model; None = loopback's
    shared_memory: bool = False  # every rank on one machine: try the shared-memory plane (collective/shm.py)

    def to_wire(self) -> dict[str, Any]:
        return {
            "job": self.job, "rank": self.rank, "world": self.world, "model": self.model,
            "config": self.config, "specs": self.specs,
            "files": [[f.block, f.sha256, f.nbytes] for f in self.files],
            "server": self.server, "server_key": self.server_key, "keys": list(self.keys),
            "max_seq_len": self.max_seq_len, "timeout": self.timeout,
            "algorithm": self.algorithm, "compression": self.compression, "threads": self.threads,
            "cpu_slot": None if self.cpu_slot is None else list(self.cpu_slot),
            "window": self.window,
            "link_cost": None if self.link_cost is None else list(self.link_cost),
            "shared_memory": self.shared_memory,
        }

    @classmethod
    def from_wire(cls, body: Any) -> JobSpec:
        b = body_map(body)
        job = need(b, "job", str)
        if not _JOB_RE.match(job):
            raise ProtocolError("job id must be 8-32 lowercase hex digits")
        world = need(b, "world", int)
        rank = need(b, "rank", int)
        if not 1 <= world <= 256 or not 0 < rank < world:
            raise ProtocolError("a worker's rank must be in 1..world-1")
        keys = need(b, "keys", list, max_len=256)
        if len(keys) != world or not all(isinstance(k, bytes) and len(k) == 32 for k in keys):
            raise ProtocolError("keys must hold one 32-byte key per rank")
        files = []
        for item in need(b, "files", list, max_len=MAX_FILES):
            if (not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], str)
                    or not re.match(r"^[a-z]+(_[0-9]+)?$", item[0]) or not isinstance(item[1], str)
                    or not _SHA_RE.match(item[1]) or not isinstance(item[2], int) or item[2] < 0):
                raise ProtocolError("files must be [block, sha256, nbytes] entries")
            files.append(JobFile(item[0], item[1], item[2]))
        server = need(b, "server", str, max_len=256)
        if not server.startswith("tcp://"):
            raise ProtocolError("server must be a tcp:// endpoint")
        server_key = need(b, "server_key", bytes)
        if len(server_key) != 32:
            raise ProtocolError("server_key must be 32 bytes")
        algorithm = maybe(b, "algorithm", str, "auto")
        compression = b.get("compression")
        if algorithm not in ALGORITHMS or compression not in COMPRESSIONS:
            raise ProtocolError("unknown collective algorithm or compression")
        timeout = need(b, "timeout", float) if isinstance(b.get("timeout"), float) else float(need(b, "timeout", int))
        max_seq_len = need(b, "max_seq_len", int)
        if not 0 < timeout <= 600 or not 0 < max_seq_len <= 1 << 20:
            raise ProtocolError("timeout or max_seq_len out of range")
        specs = need(b, "specs", list, max_len=4096)
        if not all(isinstance(s, dict) for s in specs):
            raise ProtocolError("specs must be maps")
        threads = maybe(b, "threads", int, 0)
        if not 0 <= threads <= 1024:
            raise ProtocolError("threads out of range")
        slot = b.get("cpu_slot")
        if slot is not None and not (isinstance(slot, list) and len(slot) == 2 and all(type(x) is int for x in slot)
                                     and 0 <= slot[0] < slot[1] <= 1024):
            raise ProtocolError("cpu_slot must be [i, n] with 0 <= i < n")
        window = maybe(b, "window", int, 0)
        if window != 0 and not 2 <= window <= 64:
            raise ProtocolError("window must be 0 (all in memory) or 2..64 blocks")
        cost = b.get("link_cost")
        if cost is not None and not (isinstance(cost, list) and len(cost) == 2
                                     and all(type(x) is float and math.isfinite(x) for x in cost)
                                     and 0.0 <= cost[0] <= MAX_HOP_S and MIN_LINK_BPS <= cost[1] <= MAX_LINK_BPS):
            raise ProtocolError("link_cost must be [seconds per hop, bytes per second] within range")
        shared_memory = maybe(b, "shared_memory", bool, False)
        return cls(job, rank, world, need(b, "model", str, max_len=128), need(b, "config", dict), specs,
                   tuple(files), server, server_key, tuple(keys), max_seq_len, timeout, algorithm, compression,
                   threads, None if slot is None else (slot[0], slot[1]), window,
                   None if cost is None else (cost[0], cost[1]), shared_memory)
