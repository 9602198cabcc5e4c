"""The device profile's GFLOP/s: measured with the torch threads a rank would run, best window."""

from __future__ import annotations

import json

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

    series = iter([[10.0, 40.0, 20.0], [30.0], [25.0], [5.0]])  # the start-up series, then one each time
    published: list[dict] = []
    firsts: list[bool] = []

    async def fake_measurements(self, first: bool):
        firsts.append(first)
        for g in next(series):
            yield {"gflops": g, "mem_available": len(published) + 1}

    class Membership:
        me = SimpleNamespace(profile={"cpu_logical": 2, "disk_read_mbps": 99.0})

        def update_self(self, profile):
            published.append(profile)
            self.me = SimpleNamespace(profile=profile)

    monkeypatch.setattr(service.ProfileService, "_measurements", fake_measurements)
    monkeypatch.setattr(service, "REMEASURE_S", 0.001)
    svc = service.ProfileService(SimpleNamespace(config=SimpleNamespace(profile_delay=0.0)), Membership())

    async def run() -> None:
        task = asyncio.create_task(svc._measure())
        while len(published) < 6 and not task.done():
            await asyncio.sleep(0.001)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())
    assert [p["gflops"] for p in published[:6]] == [10.0, 40.0, 40.0, 40.0, 30.0, 30.0]  # best of the last 3
    assert [p["mem_available"] for p in published[:6]] == [1, 2, 3, 4, 5, 6]  # the rest is the newest
    assert all(p["cpu_logical"] == 2 and p["disk_read_mbps"] == 99.0 for p in published)
    assert firsts[:4] == [True, False, False, False]  # the start-up series (and the disk) only once


def test_measuring_child_prints_one_profile_per_line_and_the_disk_only_in_the_first(tmp_path, monkeypatch, capsys,
                                                                                     keep_torch_threads):
    monkeypatch.setattr(profile, "measure_gflops", lambda: 1.0)
    monkeypatch.setattr(profile, "measure_disk_read_mbps", lambda d: 7.0)
    profile.main([str(tmp_path), "--repeat", "2", "--pause", "0"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [("disk_read_mbps" in x, x["gflops"]) for x in lines] == [(True, 1.0), (False, 1.0)]
    profile.main([str(tmp_path), "--no-disk"])
    assert "disk_read_mbps" not in json.loads(capsys.readouterr().out)
