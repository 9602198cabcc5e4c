"""Memory predictor and planning under a memory budget (pure functions)."""

from __future__ import annotations

import pytest

from edgemesh.errors import ConfigError
from edgemesh.placement.budget import plan_with_budget
from edgemesh.placement.devices import Device
from edgemesh.placement.memory import (
    block_bytes,
    parse_size,
    participant_blocks,
    predict_participant,
    window_bytes,
)
from edgemesh.placement.plan import Plan, plan
from edgemesh.weights.config import ModelConfig
from edgemesh.weights.quant import quantize_block
from edgemesh.weights.shard import ShardSpec
from edgemesh.weights.synth import random_block
from edgemesh.weights.window import execution_order

pytestmark = pytest.mark.unit
MiB = 1 << 20


def _config(**kw: object) -> ModelConfig:
    base = dict(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=4,
                num_hidden_layers=3, vocab_size=128, max_position_embeddings=256, rope_theta=10000.0)
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


def test_window_bytes_is_the_largest_cyclic_run() -> None:
    assert window_bytes([5, 1, 1, 7], 2) == 12  # 7 then 5 (wraps to the next token)
    assert window_bytes([5, 1, 1, 7], 3) == 13
    assert window_bytes([5, 1, 1, 7], 0) == 14
    assert window_bytes([5, 1], 4) == 6


@pytest.mark.parametrize("size,want", [("2GiB", 2 << 30), ("384MiB", 384 << 20), ("1.5GB", 1_500_000_000),
                                       ("500M", 500_000_000), (" 1 gib ", 1 << 30)])
def test_parse_size(size: str, want: int) -> None:
    assert parse_size(size) == want


@pytest.mark.parametrize("size", ["", "two GiB", "2XB", "-1GiB", "1MiB"])
def test_parse_size_errors(size: str) -> None:
    with pytest.raises(ConfigError):
        parse_size(size)


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("kw", [{}, {"qkv_bias": True, "o_bias": True, "mlp_bias": True}, {"tie_word_embeddings": True}])
def test_block_bytes_match_the_real_slices(int8: bool, kw: dict) -> None:  # type: ignore[type-arg]
    from edgemesh.weights.shard import slice_block

    config = _config(**kw)
    for spec in (ShardSpec((0, 2), 10, 50, True), ShardSpec((3,), 50, 96, False), ShardSpec((), 0, 0, False)):
        for block in config.block_names():
            full = random_block(config, block, 0)
            if int8:
                full = quantize_block(full, "int8")
            t = slice_block(config, block, full, spec) if block.startswith(("attn", "mlp")) else full
            real = sum(x.numel() * x.element_size() for x in t.values())
            assert block_bytes(config, block, spec, 1 if int8 else 4) == real, block


def test_participant_blocks_follow_the_execution_order() -> None:
    config = _config(tie_word_embeddings=True)
    specs = [ShardSpec.full(config)] * 3
    for rank in (0, 1):
        assert [n for n, _ in participant_blocks(config, specs, rank, 4)] == execution_order(config, rank)


def test_prediction_window_vs_all() -> None:
    config = _config(num_hidden_layers=6)
    specs = [ShardSpec.full(config)] * 6
    allm = predict_participant(config, specs, 1, dtype_bytes=4, window=0, context_len=64, baseline_bytes=0)
    w2 = predict_participant(config, specs, 1, dtype_bytes=4, window=2, context_len=64, baseline_bytes=0)
    blocks = [b for _, b in participant_blocks(config, specs, 1, 4)]
    assert allm.weights == sum(blocks)
    assert w2.weights == max(blocks[0] + blocks[1], blocks[1] + blocks[2])
    assert w2.total < allm.total and w2.kv_cache == allm.kv_cache > 0


def _devices(n: int, mem: int, disk: float = 0.0) -> list[Device]:
    return [Device(f"d{i}", 50.0, mem, 10.0, disk) for i in range(n)]


def test_no_budget_is_the_ordinary_plan() -> None:
    config = _config()
    a = plan_with_budget(config, _devices(2, 8 << 30), budget_bytes=None, context_len=64)
    b = plan(config, _devices(2, 8 << 30), context_len=64)
    assert a.to_json() == b.to_json() and a.window == 0


def _big() -> ModelConfig:  # ~1.1 GB fp32 decoder: 24 layers of 4·1024² + 3·1024·2816
    return ModelConfig(1024, 2816, 16, 4, 24, 8000, max_position_embeddings=4096)


def test_budget_that_holds_everything_keeps_weights_in_memory() -> None:
    p = plan_with_budget(_big(), _devices(2, 16 << 30), budget_bytes=4 << 30, context_len=512, baseline_bytes=256 * MiB)
    assert p.window == 0 and p.memory_budget == 4 << 30
    assert all(d.mem_bytes <= d.mem_limit == 4 << 30 for d in p.devices)


@pytest.mark.parametrize("world", [1, 2])
def test_small_budget_streams_and_fits(world: int) -> None:
    budget = 600 * MiB
    p = plan_with_budget(_big(), _devices(world, 16 << 30, disk=500.0), budget_bytes=budget, context_len=512,
                         baseline_bytes=256 * MiB)
    assert p.window >= 2
    assert all(d.mem_bytes <= budget for d in p.devices)
    for k, c in enumerate(p.window_checks):
        pred = predict_participant(_big(), p.specs_for(k), k, dtype_bytes=4, window=p.window, context_len=512,
                                   baseline_bytes=256 * MiB, world_size=world)
        assert c["peak_bytes"] == pred.total
        assert c["tau_f_ms"] > c["tau_a_ms"] > 0 and c["no_stall"] in (True, False)
    assert Plan.from_json(p.to_json()).window == p.window
    full = plan(_big(), _devices(world, 16 << 30), context_len=512, overhead_bytes=256 * MiB)
    assert max(d.mem_bytes for d in full.devices) > budget  # the budget really needed the window


def test_uneven_budget_shifts_the_split() -> None:
    devs = [Device("big", 50.0, 16 << 30, 10.0, 500.0), Device("small", 50.0, 290 * MiB, 10.0, 500.0)]
    p = plan_with_budget(_big(), devs, budget_bytes=800 * MiB, context_len=512, baseline_bytes=256 * MiB)
    assert p.window >= 2
    assert p.devices[1].mem_bytes <= 290 * MiB and p.devices[0].mem_bytes <= 800 * MiB
    assert p.devices[1].mlp_rows < p.devices[0].mlp_rows


def test_budget_too_small_is_refused_with_the_numbers() -> None:
    with pytest.raises(ConfigError) as exc:
        plan_with_budget(_big(), _devices(2, 16 << 30), budget_bytes=300 * MiB, context_len=512,
                         baseline_bytes=256 * MiB)
    msg = str(exc.value)
    assert "needs" in msg and "but has 300.0 MiB" in msg and "d0" in msg


def test_no_stall_check_follows_disk_speed() -> None:
    fast = plan_with_budget(_big(), _devices(1, 16 << 30, disk=1e6), budget_bytes=600 * MiB, context_len=512,
                            baseline_bytes=256 * MiB)
    slow = plan_with_budget(_big(), _devices(1, 16 << 30, disk=45.0), budget_bytes=600 * MiB, context_len=512,
                            baseline_bytes=256 * MiB)
    assert fast.window_checks[0]["no_stall"] is True and fast.window_checks[0]["stall_ms_per_token"] == 0
    assert slow.window_checks[0]["no_stall"] is False and slow.window_checks[0]["stall_ms_per_token"] > 0
    assert slow.latency.total_ms > fast.latency.total_ms
    unknown = plan_with_budget(_big(), _devices(1, 16 << 30), budget_bytes=600 * MiB, context_len=512,
                               baseline_bytes=256 * MiB)
    assert unknown.window_checks[0]["no_stall"] is None


def test_int8_budget() -> None:
    p = plan_with_budget(_big(), _devices(2, 16 << 30), budget_bytes=400 * MiB, context_len=512, dtype_bytes=1,
                         baseline_bytes=256 * MiB)
    assert p.window >= 2 and all(d.mem_bytes <= 400 * MiB for d in p.devices)



def test_job_spec_carries_the_window() -> None:
    from edgemesh.errors import ProtocolError
    from edgemesh.runtime.jobs import JobSpec

    spec = JobSpec(job="ab" * 8, rank=1, world=2, model="m", config={}, specs=[], files=(), server="tcp://127.0.0.1:1",
                   server_key=b"k" * 32, keys=(b"a" * 32, b"b" * 32), max_seq_len=64, timeout=5.0, window=3)
    assert JobSpec.from_wire(spec.to_wire()).window == 3
    old = spec.to_wire()
    del old["window"]  # a launcher without windows
    assert JobSpec.from_wire(old).window == 0
    for bad in (1, -1, 65):
        with pytest.raises(ProtocolError):
            JobSpec.from_wire({**spec.to_wire(), "window": bad})


def test_job_spec_carries_the_groups_link_cost() -> None:
    from edgemesh.errors import ProtocolError
    from edgemesh.runtime.jobs import JobSpec

    spec = JobSpec(job="ab" * 8, rank=1, world=2, model="m", config={}, specs=[], files=(), server="tcp://127.0.0.1:1",
                   server_key=b"k" * 32, keys=(b"a" * 32, b"b" * 32), max_seq_len=64, timeout=5.0,
                   link_cost=(1.2e-3, 37.5e6))
    assert JobSpec.from_wire(spec.to_wire()).link_cost == (1.2e-3, 37.5e6)
    old = spec.to_wire()
    del old["link_cost"]  # a launcher from before: the workers keep loopback's constants
    assert JobSpec.from_wire(old).link_cost is None
    for bad in ([1e-3], [1e-3, 1], ["1", 2.0], [float("nan"), 1e6], [1e-3, float("inf")], [-1.0, 1e6],
                [11.0, 1e6], [1e-3, 10.0], [1e-3, 1e13], {"a": 1.0}):
        with pytest.raises(ProtocolError):
            JobSpec.from_wire({**spec.to_wire(), "link_cost": bad})
