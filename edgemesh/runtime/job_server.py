"""The launcher's side of a job: serves weight slices to workers and gathers their endpoints.

Workers connect with their node keys (CURVE; only the job's participants are admitted), fetch
their slices in chunks (`shard.get`), then report the endpoint of their collective socket
(`job.ready`). That call is answered only once every rank has reported, with the whole
rank → endpoint table, so all ranks join the group together.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgemesh.errors import AuthError, EdgemeshError, ProtocolError
from edgemesh.identity.keys import curve_public_for
from edgemesh.mesh.rpc import RpcServer
from edgemesh.rpc.dispatch import Call, Reply, RpcStats
from edgemesh.transport.endpoint import parse_endpoint, tcp_endpoint
from edgemesh.transport.zmq_link import CLIENT_MAX_FRAME, ZmqTransport
from edgemesh.wire.schema import body_map, need
from edgemesh.wire.tensor import TensorSpec

log = logging.getLogger(__name__)

CHUNK_MAX = CLIENT_MAX_FRAME  # one chunk is one reply frame: a worker's socket takes no larger
READY_WAIT = 600.0


class JobFailed(EdgemeshError):
    """A worker reported that it could not start its part of the job."""


@dataclass
class JobState:
    job: str
    world: int
    keys: list[bytes]  # curve key (z85) per rank
    files: dict[str, Path]  # sha256 → file on this machine
    endpoints: dict[int, str] = field(default_factory=dict)
    # Rank 0's collective endpoint as each rank should dial it: the master listens on every
    # interface and names, per rank, an address of its own that rank can reach.
    rank0_for: dict[int, str] = field(default_factory=dict)
    contacted: set[int] = field(default_factory=set)  # ranks whose worker has reached this server
    failed_rank: int | None = None
    failures: list[str] = field(default_factory=list)  # every worker's report (failure = the first)
    served: dict[int, int] = field(default_factory=dict)  # bytes sent per rank
    failure: str | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def rank_of(self, curve_key: bytes) -> list[int]:
        return [r for r, k in enumerate(self.keys) if k == curve_key]


class JobServer:
    def __init__(self, transport: ZmqTransport, host: str) -> None:
        self.transport = transport
        self.jobs: dict[str, JobState] = {}
        self.stats = RpcStats()
        self.sock = transport.server(tcp_endpoint(host, 0), "data", self._allowed)
        self.endpoint = transport.bound_endpoint(self.sock)
        self.port = parse_endpoint(self.endpoint)[1]
        self._server = RpcServer(self.sock, b"launcher", {
            "job.hello": self._job_hello, "shard.get": self._shard_get, "job.ready": self._job_ready,
            "job.failed": self._job_failed,
        }, self.stats)

    def endpoint_for(self, host: str) -> str:
        """This server's endpoint as a worker that reaches us at ``host`` should dial it."""
        return tcp_endpoint(host, self.port)

    def _allowed(self, curve_key: bytes) -> bool:
        return any(curve_key in j.keys for j in self.jobs.values())

    async def run(self) -> None:
        await self._server.run()

    def add(self, job: str, ed_keys: list[bytes], files: dict[str, Path]) -> JobState:
        state = JobState(job, len(ed_keys), [curve_public_for(k) for k in ed_keys], files)
        self.jobs[job] = state
        return state

    def remove(self, job: str) -> None:
        state = self.jobs.pop(job, None)
        if state is not None:
            state.failure = state.failure or "job cancelled"
            state.ready.set()
            state.changed.set()

    def _job(self, call: Call, body: dict[str, Any]) -> tuple[JobState, int]:
        job = self.jobs.get(need(body, "job", str, max_len=64))
        if job is None:
            raise ProtocolError("unknown job")
        ranks = job.rank_of(call.peer_key)
        rank = body.get("rank")
        if not isinstance(rank, int) or rank not in ranks:
            raise AuthError("this key is not a participant of the job at that rank")
        job.contacted.add(rank)
        job.changed.set()
        return job, rank

    async def _job_hello(self, call: Call) -> Any:
        """A worker's first call: proves it reaches us before it spends time loading anything."""
        self._job(call, body_map(call.body))
        return {}

    async def _shard_get(self, call: Call) -> Any:
        body = body_map(call.body)
        job, rank = self._job(call, body)
        sha = need(body, "sha256", str, max_len=64)
        path = job.files.get(sha)
        if path is None:
            raise ProtocolError("that slice is not part of the job")
        offset, length = need(body, "offset", int), need(body, "length", int)
        if offset < 0 or not 0 < length <= CHUNK_MAX:
            raise ProtocolError(f"chunk length must be 1..{CHUNK_MAX}")

        def read() -> bytes:
            with open(path, "rb") as fh:
                fh.seek(offset)
                return fh.read(length)

        data = await asyncio.to_thread(read)
        job.served[rank] = job.served.get(rank, 0) + len(data)
        job.changed.set()
        return Reply({"n": len(data)}, [(TensorSpec("uint8", (len(data),)), data)])

    async def _job_ready(self, call: Call) -> Any:
        body = body_map(call.body)
        job, rank = self._job(call, body)
        endpoint = need(body, "endpoint", str, max_len=256)
        if not endpoint.startswith("tcp://"):
            raise ProtocolError("endpoint must be tcp://")
        job.endpoints[rank] = endpoint
        job.changed.set()
        if len(job.endpoints) == job.world:
            job.ready.set()
        try:
            await asyncio.wait_for(job.ready.wait(), READY_WAIT)
        except asyncio.TimeoutError:
            raise JobFailed("the other ranks did not get ready in time") from None
        if job.failure:
            raise JobFailed(job.failure)
        table = {**job.endpoints, 0: job.rank0_for.get(rank, job.endpoints.get(0, ""))}
        return {"peers": [[r, e] for r, e in sorted(table.items())]}

    async def _job_failed(self, call: Call) -> Any:
        body = body_map(call.body)
        job, rank = self._job(call, body)
        message = f"rank {rank}: {need(body, 'message', str, max_len=2000)}"
        if job.failure is None:
            job.failed_rank = rank
            job.failure = message
        if len(job.failures) < job.world:
            job.failures.append(message)
        job.ready.set()
        job.changed.set()
        return {}
