"""Jobs: the worker processes this node runs for launches elsewhere (``llm.start/stop/jobs``).

Only the member that serves a job's weights may start it, and only with our key at our rank.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from edgemesh.errors import ProtocolError, RpcError
from edgemesh.mesh.view import MembershipView
from edgemesh.rpc.dispatch import Call, Handler
from edgemesh.runtime.jobs import JobSpec
from edgemesh.runtime.services import Task
from edgemesh.runtime.services.node import Node
from edgemesh.runtime.worker_manager import WorkerManager
from edgemesh.wire.schema import body_map, need

log = logging.getLogger(__name__)


class JobsService:
    name = "jobs"

    def __init__(self, node: Node, view: MembershipView) -> None:
        self.node = node
        self.view = view
        self.workers = WorkerManager(node.state, node.host, node.advertise)

    def handlers(self) -> dict[str, Handler]:
        return {"llm.start": self._rpc_start, "llm.stop": self._rpc_stop, "llm.jobs": self._rpc_jobs}

    def tasks(self) -> list[Task]:
        return []

    async def close(self) -> None:
        await asyncio.to_thread(self.workers.stop_all)

    async def _rpc_start(self, call: Call) -> Any:
        spec = JobSpec.from_wire(call.body)
        launcher = self.view.node_for_curve_key(call.peer_key)
        if launcher is None or launcher.status != "member":  # a node that left keeps its record
            raise RpcError("only a current member may start a job", "forbidden")
        if launcher.key != spec.server_key:
            raise ProtocolError("a job must be started by the member that serves its weights")
        if spec.keys[spec.rank] != self.node.key.sign_public:
            raise ProtocolError("this job gives my rank to another key")
        return {"pid": self.workers.start(spec)}

    async def _rpc_stop(self, call: Call) -> Any:
        job = need(body_map(call.body), "job", str, max_len=64)
        owner = self.workers.owner(job)
        caller = self.view.node_for_curve_key(call.peer_key)
        if owner is not None and call.peer_key != self.node.key.curve_public and (caller is None or caller.key != owner):
            # Only the master that started the job (or this node's own CLI) ends it.
            raise RpcError("only the member that started a job may stop it", "forbidden")
        return {"stopped": await asyncio.to_thread(self.workers.stop, job)}

    async def stop_owned_by(self, key: bytes) -> list[str]:
        """Stop the workers of every job a member started, when it is removed (or left)."""
        jobs = self.workers.owned_by(key)
        for job in jobs:
            await asyncio.to_thread(self.workers.stop, job)
            log.warning("stopped the worker of job %s: the member that started it was removed", job)
        return jobs

    async def _rpc_jobs(self, call: Call) -> Any:
        return {"jobs": self.workers.jobs()}
