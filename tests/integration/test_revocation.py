"""Revocation on real daemons (issue 18 item 3): `edgemesh remove` takes a member out everywhere
and its open links stop serving it; it cannot come back by re-publishing itself, and what it
admits after its removal is refused; expired tokens are refused with a one-line message; after
`token --rotate` old tokens are refused everywhere, new ones work and the members keep talking."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from edgemesh.errors import AuthError, RpcError
from edgemesh.identity.keys import NodeKey
from edgemesh.identity.token import JoinPoint, JoinToken
from edgemesh.mesh.join_client import join_cluster
from edgemesh.mesh.records import MemberRecord, admit, sign_self
from edgemesh.mesh.rpc import RpcClient
from edgemesh.runtime.control import control
from edgemesh.transport.zmq_link import ZmqTransport

from .conftest import run_cli, states, wait_for
from .test_security import _call_as

pytestmark = [pytest.mark.integration, pytest.mark.security]


def _mesh(nodes, i):
    return f"tcp://127.0.0.1:{nodes[i].port}"


def _all_alive(sds, n=3):
    return wait_for(lambda: all(list(states(sd).values()).count("alive") == n for sd in sds), 30)


def _record(cluster_id, key, name, version=None):
    return sign_self(cluster_id, key, MemberRecord(
        key.node_id, name, key.sign_public, version or int(time.time() * 1000), "member",
        ("tcp://127.0.0.1:9",), ("tcp://127.0.0.1:10",)))


def test_removed_member_is_dropped_everywhere_its_links_stop_serving_and_it_cannot_come_back(cluster3, tmp_path):
    d, sds, nodes = cluster3
    keys = [sd.load_identity()[0] for sd in sds]
    cluster = sds[0].require_cluster()
    assert _all_alive(sds), "three alive members to start with"

    async def scenario() -> None:
        transport = ZmqTransport(keys[2])
        try:
            client = RpcClient(transport.client(_mesh(nodes, 1), keys[1].curve_public), bytes.fromhex(keys[2].node_id))
            reader = asyncio.ensure_future(client.run())
            try:
                await client.call("ping", {}, timeout=10)  # node2's own link to node1, open while it is a member
                res = await asyncio.to_thread(run_cli, "remove", "node2", "--state-dir", str(sds[0].path), home=tmp_path)
                assert res.returncode == 0, res.stderr
                assert "removed node2" in res.stderr and "--rotate" in res.stderr
                gone = lambda: all("node2" not in states(sd) for sd in sds[:2])  # noqa: E731
                assert await asyncio.to_thread(wait_for, gone, 30), "node0 and node1 dropped node2"
                # The link it already had is still connected, but serves it nothing now.
                with pytest.raises(RpcError, match="no method 'ping'"):
                    await client.call("ping", {}, timeout=10)
            finally:
                reader.cancel()
        finally:
            transport.close()

    asyncio.run(scenario())
    # The removed node was told, and says so.
    removed = wait_for(lambda: control(sds[2], "status")["removed"], 30)
    assert removed and removed["by"] == keys[0].node_id and removed["epoch"] == 1
    st = run_cli("status", "--state-dir", str(sds[2].path), home=tmp_path)
    assert "was removed from the cluster by node0" in st.stderr
    assert "node2" not in states(sds[2]), "it does not list itself as a member"

    epoch = control(sds[0], "status")["epoch"]
    rejected = control(sds[0], "status")["stats"]["rejected_records"]
    # It re-publishes itself with a much higher version; a member relays that (gossip from node1).
    old = next(r for r in [MemberRecord.from_wire(w) for w in sds[0].load_members()] if r.node_id == keys[2].node_id)
    comeback = sign_self(cluster.cluster_id, keys[2], dataclasses.replace(old, version=old.version + 10**9))
    # And it admits a new node after its removal (it still holds the key and knows the epoch).
    newcomer = NodeKey.generate()
    late = sign_self(cluster.cluster_id, newcomer, admit(cluster.cluster_id, keys[2], _record(cluster.cluster_id, newcomer, "late"), epoch))
    asyncio.run(_call_as(keys[1], _mesh(nodes, 0), keys[0].curve_public, "gossip.sync",
                         {"records": [comeback.to_wire(), late.to_wire()]}))
    st = control(sds[0], "status")
    names = {m["name"] for m in st["members"]}
    assert "node2" not in names and "late" not in names
    assert st["stats"]["rejected_records"] >= rejected + 2
    # Its join port admits no one any more, even with a token it could make from the old secret.
    token = JoinToken.issue(cluster.cluster_id, cluster.secret,
                            (JoinPoint(f"tcp://127.0.0.1:{nodes[2].port + 1}", keys[2].sign_public),))
    with pytest.raises(AuthError, match="removed from the cluster and admits no one"):
        asyncio.run(join_cluster(NodeKey.generate(), "j", token, ("tcp://127.0.0.1:9",), ("tcp://127.0.0.1:10",),
                                 timeout=15.0, discover=False))
    # The remaining members still talk.
    assert wait_for(lambda: list(states(sds[1]).values()).count("alive") == 2, 30)


def test_an_expired_token_is_refused_with_one_line(cluster3, tmp_path):
    d, sds, nodes = cluster3
    cluster = sds[0].require_cluster()
    key0 = sds[0].load_identity()[0]
    point = (JoinPoint(f"tcp://127.0.0.1:{nodes[0].port + 1}", key0.sign_public),)
    expired = JoinToken.issue(cluster.cluster_id, cluster.secret, point, ttl=60, now=time.time() - 120)
    before = control(sds[0], "status")["stats"]["refused_joins"]
    res = run_cli("join", expired.encode(), "--state-dir", str(tmp_path / "n"), "--host", "127.0.0.1",
                  "--port", "31720", "--no-mdns", "--no-start", home=tmp_path)
    assert res.returncode == 3, res.stderr
    assert "the token expired at" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert control(sds[0], "status")["stats"]["refused_joins"] == before + 1
    # `token --ttl` sets the expiry.
    res = run_cli("token", "--ttl", "30m", "--state-dir", str(sds[0].path), home=tmp_path)
    assert res.returncode == 0, res.stderr
    assert abs(JoinToken.decode(res.stdout.strip()).expires - (time.time() + 1800)) < 120


def test_rotation_stops_old_tokens_everywhere_new_ones_work_and_members_keep_talking(cluster3, tmp_path):
    d, sds, nodes = cluster3
    keys = [sd.load_identity()[0] for sd in sds]
    assert _all_alive(sds)
    old = sds[0].require_cluster()
    old_tokens = [JoinToken.issue(old.cluster_id, old.secret,
                                  (JoinPoint(f"tcp://127.0.0.1:{nodes[i].port + 1}", keys[i].sign_public),))
                  for i in range(3)]
    res = run_cli("token", "--rotate", "--state-dir", str(sds[1].path), home=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "rotated" in res.stderr
    new_token = res.stdout.strip()
    assert wait_for(lambda: all(control(sd, "status")["secret_epoch"] == 1 for sd in sds), 30), "every member has the new secret"
    assert all(sd.require_cluster().secret != old.secret for sd in sds)
    for tok in old_tokens:
        with pytest.raises(AuthError, match="rotated"):
            asyncio.run(join_cluster(NodeKey.generate(), "j", tok, ("tcp://127.0.0.1:9",), ("tcp://127.0.0.1:10",),
                                     timeout=15.0, discover=False))
    newdir = tmp_path / "newnode"
    res = run_cli("join", new_token, "--state-dir", str(newdir), "--host", "127.0.0.1", "--port", "31740",
                  "--name", "fresh", "--no-mdns", "--detach", home=tmp_path)
    try:
        assert res.returncode == 0, res.stderr
        assert wait_for(lambda: states(sds[2]).get("fresh") == "alive", 30)
        from edgemesh.identity.statedir import StateDir

        assert StateDir(newdir).require_cluster().secret == sds[0].require_cluster().secret
        # The members that were there before still talk to each other (keys, not the secret).
        assert all(list(states(sd).values()).count("alive") == 4 for sd in sds) or _all_alive(sds, 4)
    finally:
        run_cli("stop", "--state-dir", str(newdir), home=tmp_path)


def test_a_node_that_left_can_join_again_only_as_a_new_key(cluster3, tmp_path):
    d, sds, nodes = cluster3
    assert _all_alive(sds)
    old_id = sds[2].load_identity()[0].node_id
    res = run_cli("leave", "--state-dir", str(sds[2].path), home=tmp_path)
    assert res.returncode == 0, res.stderr
    assert wait_for(lambda: "node2" not in states(sds[0]), 30)
    new_key, name = sds[2].load_identity()
    assert name == "node2" and new_key.node_id != old_id
    token = run_cli("token", "--state-dir", str(sds[0].path), home=tmp_path, check=True).stdout.strip()
    res = run_cli("join", token, "--state-dir", str(sds[2].path), "--host", "127.0.0.1", "--port", str(nodes[2].port),
                  "--no-mdns", "--detach", home=tmp_path)
    try:
        assert res.returncode == 0, res.stderr
        member_ids = lambda: {m["id"]: m["state"] for m in control(sds[0], "status")["members"]}  # noqa: E731
        assert wait_for(lambda: member_ids().get(new_key.node_id) == "alive", 30)
        assert old_id not in member_ids()
    finally:
        run_cli("stop", "--state-dir", str(sds[2].path), home=tmp_path)


def test_removing_a_master_stops_the_workers_it_started(cluster3, tmp_path):
    from .test_job_authority import _jobs, _spec

    d, sds, nodes = cluster3
    keys = [sd.load_identity()[0] for sd in sds]
    assert _all_alive(sds)
    spec = _spec(keys[2], keys[1])  # node2 is the master, node1 runs its rank
    asyncio.run(_call_as(keys[2], _mesh(nodes, 1), keys[1].curve_public, "llm.start", spec.to_wire(), timeout=10))
    try:
        assert spec.job in _jobs(sds[1])
        res = run_cli("remove", "node2", "--state-dir", str(sds[0].path), home=tmp_path)
        assert res.returncode == 0, res.stderr
        # Wait for the event (the worker would also end by itself once its weight fetch times out).
        stopped = f"stopped the worker of job {spec.job}: the member that started it was removed"
        assert wait_for(lambda: stopped in sds[1].file("daemon.log").read_text(errors="replace"), 30), \
            "node1 stopped the removed master's worker"
        assert spec.job not in _jobs(sds[1])
    finally:
        control(sds[1], "llm.stop", {"job": spec.job}, timeout=10)
