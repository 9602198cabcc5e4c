"""Placement: proportional splits, zero-share devices, memory refusal, cost terms."""

from __future__ import annotations

import json

import pytest

from edgemesh.errors import ConfigError
from edgemesh.placement import Device, Link, Plan, plan, uniform_devices
from edgemesh.weights.config import ModelConfig
from edgemesh.weights.shard import check_layer_cover

pytestmark = pytest.mark.unit

GiB = 1 << 30
# SmolLM2-135M shape
SMOL = ModelConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                   num_hidden_layers=30, vocab_size=49152, tie_word_embeddings=True)


def _valid(p: Plan) -> None:
    for layer in p.layers:
        check_layer_cover(SMOL, layer)
        assert layer[0].adds_bias
    for d in p.devices:
        assert d.mem_bytes <= d.mem_limit


def test_equal_devices_get_equal_shares() -> None:
    p = plan(SMOL, uniform_devices(3, gflops=50, mem_bytes=2 * GiB))
    _valid(p)
    assert [d.kv_groups for d in p.devices] == [30, 30, 30]
    assert [d.mlp_rows for d in p.devices] == [512 * 30] * 3
    assert p.specs_for(1)[0].kv_groups == (1,)


def test_mlp_rows_follow_speed_and_groups_alternate() -> None:
    p = plan(SMOL, [Device("fast", 100, 4 * GiB), Device("slow", 50, 4 * GiB)])
    _valid(p)
    assert [d.mlp_rows for d in p.devices] == [1024 * 30, 512 * 30]
    assert [d.share for d in p.devices] == pytest.approx([2 / 3, 1 / 3], abs=1e-6)
    assert sum(d.kv_groups for d in p.devices) == 90
    # 3 groups, speeds 2:1: the fast one finishes 2 groups as soon as the slow one finishes 1
    assert all(len(layer[0].kv_groups) == 2 for layer in p.layers)


def test_slow_device_gets_no_heads_but_some_rows() -> None:
    p = plan(SMOL, [Device("a", 100, 4 * GiB), Device("b", 100, 4 * GiB), Device("crawler", 5, 4 * GiB)])
    _valid(p)
    crawler = p.devices[2]
    assert crawler.kv_groups == 0  # one group would take it 20× longer than the others
    assert 0 < crawler.mlp_rows < 0.03 * 1536 * 30


def test_device_without_room_or_speed_is_left_out() -> None:
    devs = [Device("m", 50, 4 * GiB), Device("tiny", 50, 200 << 20), Device("w", 50, 4 * GiB), Device("off", 0, 4 * GiB)]
    p = plan(SMOL, devs)
    _valid(p)
    assert [d.id for d in p.devices] == ["m", "w"] and [d.rank for d in p.devices] == [0, 1]
    assert all(len(layer) == 2 for layer in p.layers)
    assert any(n.startswith("tiny: left out (0.20 GiB memory") for n in p.notes)
    assert any(n.startswith("off: left out (no compute)") for n in p.notes)


def test_memory_caps_shift_work() -> None:
    free = plan(SMOL, [Device("a", 100, 4 * GiB), Device("b", 50, 4 * GiB)])
    capped = plan(SMOL, [Device("a", 100, 800 << 20), Device("b", 50, 4 * GiB)])
    _valid(capped)
    assert capped.devices[0].mlp_rows < free.devices[0].mlp_rows
    assert capped.devices[0].mem_bytes <= 800 << 20
    assert any("capped by memory" in n for n in capped.notes)


def test_refuses_with_numbers_when_it_cannot_fit() -> None:
    with pytest.raises(ConfigError, match=r"does not fit: the decoder needs \d+\.\d+ GiB .* have \d+\.\d+ GiB"):
        plan(SMOL, uniform_devices(2, gflops=50, mem_bytes=500 << 20))
    with pytest.raises(ConfigError, match="master 'node0' cannot hold embedding"):
        plan(SMOL, uniform_devices(2, gflops=50, mem_bytes=300 << 20))


def test_latency_terms() -> None:
    one = plan(SMOL, uniform_devices(1, gflops=50, mem_bytes=4 * GiB))
    assert one.latency.allreduce_latency_ms == 0 and one.latency.bandwidth_ms == 0
    devs = uniform_devices(4, gflops=50, mem_bytes=4 * GiB)
    links = [Link("node0", f"node{i}", 2.0, 300.0) for i in range(1, 4)]
    four = plan(SMOL, devs, links)
    lat = four.latency
    assert lat.allreduces_per_token == 60
    # + half a round trip for the hidden state's broadcast and half for the token choice's gather
    assert lat.allreduce_latency_ms == pytest.approx(60 * 2.0 + 2.0)
    assert lat.bytes_per_token == (2 * 60 + 1) * 3 * 576 * 4 + 3 * 40
    assert lat.bandwidth_ms == pytest.approx(lat.bytes_per_token * 8 / 300e6 * 1e3, rel=1e-3)
    assert lat.compute_ms < one.latency.compute_ms / 2  # the decoder is split 4 ways
    assert lat.total_ms == pytest.approx(lat.compute_ms + lat.allreduce_latency_ms + lat.bandwidth_ms, abs=1e-3)


def test_plan_json_round_trip() -> None:
    p = plan(SMOL, [Device("a", 80, 4 * GiB), Device("b", 30, 2 * GiB)], model="smol")
    text = json.dumps(p.to_json())
    back = Plan.from_json(json.loads(text))
    assert back.layers == p.layers and back.devices == p.devices and back.latency == p.latency


def test_device_from_node_profile_and_measured_profile() -> None:
    node = {"name": "pi5", "cpu": {"cores": 4, "quota": 1.0}, "memory": {"mib": 8192},
            "disk": {"read_mbyte_s": 90}, "link": {"up_mbit": 300, "down_mbit": 900, "delay_ms": 0.5}}
    d = Device.from_profile("pi5", node, gflops_per_core=20)
    assert (d.gflops, d.mem_bytes, d.link_mbit, d.link_delay_ms) == (20, 8 * GiB, 300, 0.5)
    measured = {"gflops": 61.5, "mem_total": 16 * GiB, "mem_available": 9 * GiB, "limits": {"mem_bytes": None}}
    assert Device.from_profile("x", measured).mem_bytes == 9 * GiB
    with pytest.raises(ConfigError, match="unusable profile"):
        Device.from_profile("bad", {"cpu": {"cores": 2}})
