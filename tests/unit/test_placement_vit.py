"""Greedy placement of ViT sub-models: memory respected, earliest-finish rule, deterministic."""

from __future__ import annotations

import itertools

import pytest

from edgemesh.placement.devices import Device
from edgemesh.placement.vit import PartDemand, PlacementError, compute_ms, place_parts

pytestmark = pytest.mark.unit

MiB = 1 << 20


def dev(name: str, gflops: float, mib: int) -> Device:
    return Device(name, gflops, mib * MiB)


def test_largest_part_goes_to_the_fastest_device_with_memory() -> None:
    devices = [dev("slow", 1.0, 100), dev("fast", 4.0, 100)]
    parts = [PartDemand("a", 1_000_000, 10 * MiB), PartDemand("b", 4_000_000, 10 * MiB)]
    p = place_parts(parts, devices)
    assert p.device_of("b") == "fast"  # placed first (largest), finishes earliest there
    # a: on fast it would finish at 1 + 0.25 ms; on slow at 1 ms → slow
    assert p.device_of("a") == "slow"
    assert p.makespan_ms == pytest.approx(max(compute_ms(4_000_000, devices[1]), compute_ms(1_000_000, devices[0])))
    assert [a.part for a in p.assignments] == ["b", "a"]


def test_memory_is_respected_even_when_a_device_is_faster() -> None:
    devices = [dev("big-slow", 1.0, 1000), dev("small-fast", 100.0, 5)]
    parts = [PartDemand("p0", 1_000_000, 6 * MiB), PartDemand("p1", 500_000, 4 * MiB), PartDemand("p2", 400_000, 4 * MiB)]
    p = place_parts(parts, devices)
    assert p.device_of("p0") == "big-slow"  # does not fit the fast one
    assert p.device_of("p1") == "small-fast"
    assert p.device_of("p2") == "big-slow"  # small-fast has only 1 MiB left
    used = {d.id: 0 for d in devices}
    for a in p.assignments:
        used[a.device] += next(x.mem_bytes for x in parts if x.name == a.part)
    assert all(used[d.id] <= d.mem_bytes for d in devices)


def test_parts_sharing_a_device_run_one_after_another() -> None:
    p = place_parts([PartDemand(f"p{i}", 1_000_000, MiB) for i in range(3)], [dev("only", 1.0, 10)])
    assert [(a.start_ms, a.finish_ms) for a in p.assignments] == [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)]
    assert p.makespan_ms == pytest.approx(3.0)


def test_greedy_rule_matches_a_brute_force_of_the_same_rule() -> None:
    """Each step picks the device minimising its finish time among those with memory: check it
    against every alternative for that step, on a mixed set of devices."""
    devices = [dev("a", 2.0, 30), dev("b", 5.0, 12), dev("c", 3.0, 20), dev("d", 1.0, 64)]
    parts = [PartDemand(f"p{i}", f, m * MiB) for i, (f, m) in enumerate(
        [(3_000_000, 10), (2_500_000, 11), (2_000_000, 9), (1_000_000, 5), (900_000, 8), (100_000, 2)])]
    p = place_parts(parts, devices)
    busy = {d.id: 0.0 for d in devices}
    free = {d.id: d.mem_bytes for d in devices}
    for a in p.assignments:
        part = next(x for x in parts if x.name == a.part)
        options = {d.id: busy[d.id] + compute_ms(part.flops, d) for d in devices if free[d.id] >= part.mem_bytes}
        assert a.device in options and options[a.device] == pytest.approx(min(options.values()))
        busy[a.device] = a.finish_ms
        free[a.device] -= part.mem_bytes
    assert p.makespan_ms == pytest.approx(max(busy.values()))
    # and within 2× of the best makespan over all assignments (LPT's bound on related machines)
    best = min(max(sum(compute_ms(parts[i].flops, devices[k]) for i in range(len(parts)) if assign[i] == k)
                   for k in range(len(devices)))
               for assign in itertools.product(range(len(devices)), repeat=len(parts)))
    assert p.makespan_ms <= 2 * best


def test_no_device_with_memory_is_a_clear_error() -> None:
    with pytest.raises(PlacementError, match="no device has memory for big"):
        place_parts([PartDemand("big", 1, 50 * MiB)], [dev("x", 1.0, 10), dev("y", 1.0, 20)])
    with pytest.raises(PlacementError):
        place_parts([PartDemand("a", 1, 1)], [])


def test_the_fixed_cost_per_operation_is_part_of_the_prediction() -> None:
    p = place_parts([PartDemand("a", 2_000_000, MiB, ops=100)], [dev("x", 1.0, 10)], op_us=5.0)
    assert p.makespan_ms == pytest.approx(2.0 + 0.5)
