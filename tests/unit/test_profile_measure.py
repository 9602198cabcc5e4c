"""The device profile's GFLOP/s: measured with the torch threads a rank would run, best window."""

from __future__ import annotations

import pytest
import torch

from edgemesh.mesh import profile
from edgemesh.mesh.profile import measure_gflops, torch_threads

pytestmark = pytest.mark.unit


def test_torch_threads_follow_the_quota_and_the_processes_sharing_the_machine():
    assert torch_threads(None, 8) == 8
    assert torch_threads(0.5, 2) == 1  # a fraction of a core: one thread, never zero
    assert torch_threads(3.0, 2) == 2  # a quota above the cores counts as the cores
    assert torch_threads(None, 8, 3) == 2
    assert torch_threads(None, 2, 3) == 1


@pytest.fixture
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_measurement_runs_with_the_quota_threads_and_reports_its_best_window(monkeypatch, keep_torch_threads):
    monkeypatch.setattr(profile, "cgroup_limits", lambda: {"mem_bytes": None, "cpu_cores": 1.0})
    n = 64
    flop = 2 * n**3
    rates = iter([4.0, 1.0, 9.0, 2.0])  # GFLOP/s of each matmul on a fake clock: warm-up, then 3 windows
    clock = [0.0]

    def fake_mm(a, b):
        clock[0] += flop / (next(rates) * 1e9)
        return a

    monkeypatch.setattr(profile.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(torch, "mm", fake_mm)
    got = measure_gflops(seconds=1e-12, n=n, windows=3)  # windows so short that each runs one matmul
    assert torch.get_num_threads() == 1
    assert got == pytest.approx(9.0, rel=1e-3)  # the best window; the warm-up's 4.0 is not one


def test_profile_service_publishes_the_best_of_its_recent_measurements(monkeypatch):
    import asyncio
    from types import SimpleNamespace

    from edgemesh.runtime.services import profile as service

    measured = iter([10.0, 40.0, 20.0, 30.0, 25.0, 5.0])
    published: list[dict] = []
    calls: list[bool] = []

    async def fake_once(self, *, disk: bool):
        calls.append(disk)
        return {"gflops": next(measured), "mem_available": len(calls)}

    class Membership:
        me = SimpleNamespace(profile={"cpu_logical": 2, "disk_read_mbps": 99.0})

        def update_self(self, profile):
            published.append(profile)
            self.me = SimpleNamespace(profile=profile)

    monkeypatch.setattr(service.ProfileService, "_measure_once", fake_once)
    monkeypatch.setattr(service, "REMEASURE_S", (0.001,))
    svc = service.ProfileService(SimpleNamespace(config=SimpleNamespace(profile_delay=0.0)), Membership())

    async def run() -> None:
        task = asyncio.create_task(svc._measure())
        while len(published) < 6:
            await asyncio.sleep(0.001)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())
    assert [p["gflops"] for p in published] == [10.0, 40.0, 40.0, 40.0, 30.0, 30.0]  # best of the last 3
    assert [p["mem_available"] for p in published] == [1, 2, 3, 4, 5, 6]  # the rest is the newest
    assert all(p["cpu_logical"] == 2 and p["disk_read_mbps"] == 99.0 for p in published)
    assert calls[0] is True and not any(calls[1:])  # the disk only the first time
