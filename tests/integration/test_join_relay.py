"""An mDNS impostor that relays a joiner's challenge to a real member gets nothing and plants
nothing (issue 18, item 2).

A real 2-node cluster on 127.0.0.1; the token's address is stale, so the joiner falls back to
members found on the LAN. The "LAN" hands it an impostor (in this process, with its own key, as
an announcement may name any key) that passes the joiner's challenge on to the real member over
its own link and would answer register with a view of its own making."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from edgemesh.errors import TokenError
from edgemesh.identity.keys import NodeKey
from edgemesh.identity.statedir import StateDir
from edgemesh.identity.token import JoinPoint, JoinToken
from edgemesh.mesh import join_client
from edgemesh.mesh.records import MemberRecord, admit, sign_self
from edgemesh.mesh.rpc import RpcServer, rpc_session
from edgemesh.rpc.dispatch import Call, RpcStats
from edgemesh.runtime import local_cluster
from edgemesh.runtime.control import control
from edgemesh.transport.zmq_link import ZmqTransport
from tests.integration.conftest import cluster_base_port

pytestmark = [pytest.mark.integration, pytest.mark.security]


@pytest.fixture
def cluster2(tmp_path):
    d = tmp_path / "lc"
    nodes = local_cluster.up(d, 2, base_port=cluster_base_port())
    yield [StateDir(Path(n.state_dir)) for n in nodes], nodes
    local_cluster.down(d)


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Impostor:
    """A join port with its own key that relays join.challenge to ``real`` and forges register."""

    def __init__(self, real_endpoint: str, real_curve: bytes, cluster_id: str) -> None:
        self.key = NodeKey.generate()
        self.real_endpoint, self.real_curve, self.cluster_id = real_endpoint, real_curve, cluster_id
        self.calls: list[str] = []
        self.relayed: list[dict] = []

    async def start(self) -> str:
        self.transport = ZmqTransport(self.key)
        self.transport.start()
        sock = self.transport.server("tcp://127.0.0.1:0", "join", lambda k: True)
        handlers = {"join.challenge": self.challenge, "join.register": self.register}
        self.task = asyncio.ensure_future(RpcServer(sock, bytes.fromhex(self.key.node_id), handlers, RpcStats()).run())
        return self.transport.bound_endpoint(sock)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.transport.aclose()

    async def challenge(self, call: Call) -> object:
        self.calls.append(call.method)
        async with rpc_session(self.transport, self.real_endpoint, self.real_curve,
                               bytes.fromhex(self.key.node_id)) as client:
            body, _ = await client.call("join.challenge", call.body, timeout=20)
        self.relayed.append(body)
        return body  # the real member's nonce and proof, as they are

    async def register(self, call: Call) -> object:
        self.calls.append(call.method)
        me = sign_self(self.cluster_id, self.key, admit(self.cluster_id, self.key, MemberRecord(
            self.key.node_id, "impostor", self.key.sign_public, int(time.time() * 1000), "member",
            ("tcp://127.0.0.1:9",), ("tcp://127.0.0.1:9",))))
        return {"cluster": self.cluster_id, "root": self.key.node_id, "records": [me.to_wire()], "sig": b"\0" * 64}


def test_an_mdns_impostor_relaying_the_challenge_gets_nothing_and_plants_nothing(cluster2, monkeypatch):
    sds, nodes = cluster2
    cluster = sds[0].require_cluster()
    root_key, _ = sds[0].load_identity()
    real_join = f"tcp://127.0.0.1:{nodes[0].port + 1}"
    stale = JoinToken.issue(cluster.cluster_id, cluster.secret,
                            (JoinPoint(f"tcp://127.0.0.1:{_unused_port()}", root_key.sign_public),))
    members_before = len(control(sds[0], "status")["members"])
    joiner = NodeKey.generate()
    discovered: list[JoinPoint] = []

    async def lan(cluster_id: str) -> list[JoinPoint]:
        return list(discovered)

    monkeypatch.setattr(join_client, "_discovered_points", lan)

    async def scenario() -> tuple[Impostor, object, object]:
        impostor = Impostor(real_join, root_key.curve_public, cluster.cluster_id)
        endpoint = await impostor.start()
        try:
            discovered[:] = [JoinPoint(endpoint, impostor.key.sign_public)]
            try:
                await join_client.join_cluster(joiner, "joiner", stale, ("tcp://127.0.0.1:1",),
                                               ("tcp://127.0.0.1:2",), timeout=2.0)
                failed = None
            except TokenError as exc:
                failed = exc
            # The same LAN with the real member announced after the impostor: the join goes
            # through the real one, and nothing of the impostor's is adopted.
            discovered.append(JoinPoint(real_join, root_key.sign_public))
            ok = await join_client.join_cluster(joiner, "joiner", stale, ("tcp://127.0.0.1:1",),
                                                ("tcp://127.0.0.1:2",), timeout=20.0)
            return impostor, failed, ok
        finally:
            await impostor.stop()

    impostor, failed, ok = asyncio.run(scenario())
    # The relay happened (the real member answered the impostor's challenge)…
    assert impostor.relayed and "proof" in impostor.relayed[0]
    # …but the joiner refused it before revealing its record or a MAC: the impostor got nothing.
    assert impostor.calls == ["join.challenge", "join.challenge"]
    assert failed is not None, "the join through the impostor succeeded"
    assert "failed authentication" in str(failed) and "on this link" in str(failed)
    # The real cluster gained only the one real join, the joiner none of the impostor's records.
    assert ok.via == real_join and ok.cluster.root == cluster.root
    assert impostor.key.node_id not in {r["id"] for r in ok.records}
    members = control(sds[0], "status")["members"]
    assert len(members) == members_before + 1
    assert impostor.key.node_id not in {m["id"] for m in members}
