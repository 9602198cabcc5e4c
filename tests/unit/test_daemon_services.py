"""The daemon wires its services: every handler comes from exactly one service, a second claim
on a method is refused, and a service's tasks and published addresses follow the settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgemesh.config import MeshConfig
from edgemesh.identity.statedir import StateDir
from edgemesh.runtime.daemon import NodeDaemon

pytestmark = pytest.mark.unit


def _daemon(tmp_path: Path, **settings: object) -> NodeDaemon:
    sd = StateDir(tmp_path / "n")
    key, _ = sd.load_or_create_identity("alpha")
    sd.new_cluster(key.node_id)
    if settings:
        sd.save_settings(dict(settings))
    return NodeDaemon(sd, "127.0.0.1", 7700, config=MeshConfig(mdns=False))


def test_each_method_is_served_by_the_one_service_that_registered_it(tmp_path: Path) -> None:
    d = _daemon(tmp_path)
    try:
        assert [s.name for s in d.services] == ["membership", "nat", "jobs", "profile", "supervision", "swarm", "vit"]
        owned = [m for s in d.services for m in s.handlers()]
        assert len(owned) == len(set(owned))
        assert set(d.handlers) == {*owned, "status", "admin.stop"}
        assert {"ping", "gossip.sync", "nat.signal", "nat.poll", "llm.start", "admin.leave", "swarm.commit", "vit.run", "admin.relay"} <= set(owned)
        with pytest.raises(ValueError, match="'ping'"):
            d._register("vit", {"ping": d.handlers["ping"]})
        assert set(d.membership.join_handlers()) == {"join.challenge", "join.register"}
        assert not set(d.membership.join_handlers()) & set(d.handlers)  # the join port serves only these
        # coturn is off unless `init --turn` asked for it
        assert d.coturn.tasks() == [] and d.coturn.published_servers() == []
    finally:
        d.node.transport.close()


def test_coturn_beside_the_node_adds_a_task_and_publishes_its_urls(tmp_path: Path) -> None:
    d = _daemon(tmp_path, turn="local")
    try:
        assert len(d.coturn.tasks()) == 1
        assert d.coturn.published_servers() == ["stun:127.0.0.1:3478", "turn:127.0.0.1:3478"]
        me = d.membership.open(d.coturn.published_servers(), {})
        assert me.addresses == ("tcp://127.0.0.1:7700", "stun:127.0.0.1:3478", "turn:127.0.0.1:3478")
    finally:
        d.node.transport.close()


def test_a_crashing_service_task_is_started_again_and_counted_not_fatal() -> None:
    """A bug in one background loop must not take the node off the mesh: the supervisor logs
    it, counts it and runs the task again; a task that returns is done; a cancel passes."""
    import asyncio

    from edgemesh.runtime.daemon import supervise

    runs: list[int] = []
    crashes: list[int] = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("a bug")

    asyncio.run(supervise("test flaky", flaky, lambda: crashes.append(1), first=0.01, most=0.05))
    assert len(runs) == 3 and len(crashes) == 2

    async def forever() -> None:
        await asyncio.sleep(3600)

    async def cancelled() -> None:
        task = asyncio.ensure_future(supervise("test forever", forever, lambda: crashes.append(1)))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled())
    assert len(crashes) == 2  # a cancel is not a crash
