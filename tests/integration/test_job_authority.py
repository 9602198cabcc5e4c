"""Who may start and stop a worker on a member: `llm.stop` only from the master that started the
job (or the node's own CLI), `llm.start` only from a current member — also over a link that was
opened while the caller was still a member."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from edgemesh.errors import RpcError
from edgemesh.mesh.rpc import RpcClient
from edgemesh.runtime.control import control
from edgemesh.runtime.jobs import JobFile, JobSpec
from edgemesh.transport.zmq_link import ZmqTransport
from edgemesh.weights.config import ModelConfig

from .conftest import wait_for
from .test_security import _call_as

pytestmark = [pytest.mark.integration, pytest.mark.security]


def _spec(master_key, worker_key) -> JobSpec:
    """A job whose weights never come (the server address is dead): its worker waits on the fetch."""
    config = ModelConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=1, vocab_size=300, max_position_embeddings=256)
    return JobSpec(job=secrets.token_hex(8), rank=1, world=2, model="tiny", config=config.to_json(), specs=[],
                   files=(JobFile("block_0", "ab" * 32, 10),), server="tcp://127.0.0.1:9",
                   server_key=master_key.sign_public, keys=(master_key.sign_public, worker_key.sign_public),
                   max_seq_len=64, timeout=5.0)


def _jobs(state) -> list[str]:
    return [j["job"] for j in control(state, "llm.jobs")["jobs"]]


def test_only_the_master_that_started_a_job_may_stop_it(cluster3):
    d, sds, nodes = cluster3
    master, worker, other = (sd.load_identity()[0] for sd in sds)
    mesh1 = f"tcp://127.0.0.1:{nodes[1].port}"
    spec = _spec(master, worker)
    assert wait_for(lambda: len(control(sds[1], "status")["members"]) == 3, 15), "node1 knows every member"
    asyncio.run(_call_as(master, mesh1, worker.curve_public, "llm.start", spec.to_wire(), timeout=5))
    assert spec.job in _jobs(sds[1])
    try:
        with pytest.raises(RpcError, match="only the member that started"):
            asyncio.run(_call_as(other, mesh1, worker.curve_public, "llm.stop", {"job": spec.job}, timeout=5))
        assert spec.job in _jobs(sds[1]), "another member's stop left the job running"
        body, _ = asyncio.run(_call_as(master, mesh1, worker.curve_public, "llm.stop", {"job": spec.job}, timeout=10))
        assert body["stopped"] is True and spec.job not in _jobs(sds[1])
    finally:
        control(sds[1], "llm.stop", {"job": spec.job}, timeout=10)  # the node's own key may always


def test_a_node_that_left_cannot_start_a_job_over_a_link_it_still_holds(cluster3):
    d, sds, nodes = cluster3
    leaver, worker = sds[2].load_identity()[0], sds[1].load_identity()[0]
    mesh1 = f"tcp://127.0.0.1:{nodes[1].port}"
    spec = _spec(leaver, worker)
    member = lambda: any(m["id"] == leaver.node_id for m in control(sds[1], "status")["members"])  # noqa: E731
    assert wait_for(member, 15), "node1 knows node2 as a member (the mesh port admits it)"

    async def scenario() -> None:
        transport = ZmqTransport(leaver)
        try:
            client = RpcClient(transport.client(mesh1, worker.curve_public), bytes.fromhex(leaver.node_id))
            reader = asyncio.ensure_future(client.run())
            try:
                await client.call("ping", {}, timeout=5)  # the link is up while it is a member
                await asyncio.to_thread(control, sds[2], "admin.leave", None, 10)
                assert await asyncio.to_thread(wait_for, lambda: not member(), 15), "node1 saw node2 leave"
                # Refused by the mesh authorizer now (every call from a node that left is), before
                # the jobs service's own "only a current member" check is reached.
                with pytest.raises(RpcError, match="no method 'llm.start'"):
                    await client.call("llm.start", spec.to_wire(), timeout=5)
            finally:
                reader.cancel()
        finally:
            transport.close()

    asyncio.run(scenario())
    assert spec.job not in _jobs(sds[1])
