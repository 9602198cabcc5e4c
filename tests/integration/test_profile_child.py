"""The profile service against the real measuring child: a series of profiles, one per line."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from edgemesh.runtime.services import profile as service

pytestmark = pytest.mark.integration


def test_start_up_series_arrives_profile_by_profile_and_the_child_is_gone(tmp_path, monkeypatch):
    monkeypatch.setattr(service, "STARTUP_MEASUREMENTS", 2)
    monkeypatch.setattr(service, "PAUSE_S", 0.0)
    node = SimpleNamespace(state=SimpleNamespace(path=tmp_path), config=SimpleNamespace(profile_delay=0.0))
    svc = service.ProfileService(node, SimpleNamespace())

    async def collect() -> list[dict]:
        return [p async for p in svc._measurements(True)]

    got = asyncio.run(collect())
    assert len(got) == 2
    assert all(p["gflops"] > 0 and p["cpu_logical"] >= 1 for p in got)
    assert "disk_read_mbps" in got[0] and "disk_read_mbps" not in got[1]
    assert not list(tmp_path.iterdir())  # the disk test's file is removed


def test_a_daemon_stopping_mid_series_kills_the_child(tmp_path, monkeypatch):
    monkeypatch.setattr(service, "STARTUP_MEASUREMENTS", 3)
    monkeypatch.setattr(service, "PAUSE_S", 30.0)  # the child would sleep 30 s after the first
    node = SimpleNamespace(state=SimpleNamespace(path=tmp_path), config=SimpleNamespace(profile_delay=0.0))
    svc = service.ProfileService(node, SimpleNamespace())
    spawned: list = []
    real = asyncio.create_subprocess_exec

    async def spy(*a, **k):
        proc = await real(*a, **k)
        spawned.append(proc)
        return proc

    monkeypatch.setattr(service.asyncio, "create_subprocess_exec", spy)

    async def first_then_stop() -> None:
        gen = svc._measurements(True)
        assert (await gen.__anext__())["gflops"] > 0
        await gen.aclose()  # what cancelling the service's task does to it

    asyncio.run(first_then_stop())
    assert spawned and spawned[0].returncode is not None  # killed and reaped, not left sleeping
