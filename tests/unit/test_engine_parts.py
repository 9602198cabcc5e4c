"""Pure parts of serving: stop strings, member choice, thread split."""

from __future__ import annotations

import pytest

from edgemesh.errors import ConfigError
from edgemesh.runtime.engine import StopMatcher
from edgemesh.config import LaunchOptions
from edgemesh.placement.members import choose_members, devices_and_links
from edgemesh.runtime.cpu import threads_per_rank

pytestmark = pytest.mark.unit


def feed(stops: tuple[str, ...], pieces: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out, hit = [], False
    for p in pieces:
        text, hit = m.push(p)
        out.append(text)
        if hit:
            break
    if not hit:
        out.append(m.flush())
    return "".join(out), hit


def test_stop_string_split_across_pieces_is_cut_and_not_emitted():
    assert feed(("END",), ["hello E", "N", "D and more"]) == ("hello ", True)


def test_text_that_only_looks_like_a_stop_prefix_is_released():
    assert feed(("END",), ["hello E", "NOUGH"]) == ("hello ENOUGH", False)
    assert feed(("END",), ["tail E"]) == ("tail E", False)  # flushed at the end


def test_earliest_of_several_stops_wins_and_no_stops_passes_everything():
    assert feed(("b", "zz"), ["aazzb"]) == ("aa", True)
    assert feed((), ["a", "b"]) == ("ab", False)


def _member(i: str, name: str, state: str = "alive", host: str = "127.0.0.1", cores: int = 2) -> dict:
    return {"id": i, "name": name, "state": state, "addresses": [f"tcp://{host}:7700"],
            "profile": {"cpu_logical": cores}}


MEMBERS = [_member("c3", "node2"), _member("a1", "node0"), _member("b2", "node1"), _member("d4", "node3", "dead")]


def test_this_node_is_master_and_others_follow_by_name():
    chosen = choose_members(MEMBERS, "b2", LaunchOptions())
    assert [m["name"] for m in chosen] == ["node1", "node0", "node2"]
    assert [m["name"] for m in choose_members(MEMBERS, "b2", LaunchOptions(nodes=2))] == ["node1", "node0"]
    assert [m["name"] for m in choose_members(MEMBERS, "b2", LaunchOptions(names=("node2",)))] == ["node1", "node2"]


def test_asking_for_more_or_unknown_members_is_refused_unless_degraded():
    with pytest.raises(ConfigError, match="only 3 member"):
        choose_members(MEMBERS, "a1", LaunchOptions(nodes=4))
    with pytest.raises(ConfigError, match="no alive member named 'node3'"):
        choose_members(MEMBERS, "a1", LaunchOptions(names=("node3",)))
    # After a failure the launcher takes what is left instead of refusing.
    assert len(choose_members(MEMBERS, "a1", LaunchOptions(nodes=4), degraded=True)) == 3
    assert len(choose_members(MEMBERS, "a1", LaunchOptions(names=("node3", "node2")), degraded=True)) == 2


def test_ranks_on_one_machine_split_its_cores():
    local = [_member(str(i), f"n{i}") for i in range(3)]
    assert threads_per_rank(local) == [1, 1, 1]  # 2 cores, 3 ranks: one thread each
    spread = [_member("a", "a", host="10.0.0.1", cores=4), _member("b", "b", host="10.0.0.2", cores=4)]
    assert threads_per_rank(spread) == [0, 0]  # alone on its machine: torch's default
    capped = _member("c", "c", host="10.0.0.3", cores=2)
    capped["profile"]["limits"] = {"cpu_cores": 0.5}  # a cgroup quota: torch would start 2 threads
    big = _member("d", "d", host="10.0.0.4", cores=8)
    big["profile"]["limits"] = {"cpu_cores": 4.0}
    assert threads_per_rank([capped, big]) == [1, 4]


def test_ranks_on_one_machine_each_get_their_share_of_its_speed_in_the_plan():
    def member(i: str, host: str) -> dict:
        m = _member(i, i, host=host)
        m["profile"].update(gflops=24.0, mem_bw_gbps=12.0, mem_total=8 << 30)
        return m

    slow = member("b", "10.0.0.1")
    slow["profile"]["gflops"] = 16.0  # measured while the other was busy: same machine, same speed
    devs, _ = devices_and_links([member("a", "10.0.0.1"), slow, member("c", "10.0.0.2")])
    assert [(d.gflops, d.mem_bw_gbps) for d in devs] == [(12.0, 6.0), (12.0, 6.0), (24.0, 12.0)]
    # Three on a 2-core machine: the master has a core to itself, the other two share one, and
    # each gets the share of the machine its core gives it (less where the core is time-shared).
    from edgemesh.placement.members import TIME_SHARED

    devs, _ = devices_and_links([member("a", "10.0.0.1"), slow, member("c", "10.0.0.1")])
    assert [(d.gflops, d.mem_bw_gbps) for d in devs] == [(12.0, 6.0)] + [(6.0 * TIME_SHARED, 3.0 * TIME_SHARED)] * 2


def test_link_table_keeps_the_minimum_of_recent_rtts_for_the_planner():
    from edgemesh.mesh.links import RTT_WINDOW, LinkTable

    t = LinkTable()
    t.set_path("p", "direct")
    for ms in [5.0, 0.8, 9.0, 3.0]:
        t.rtt("p", ms)
    j = t.to_json("p")
    assert j["rtt_min_ms"] == 0.8 and j["rtt_ms"] > 0.8
    for _ in range(RTT_WINDOW):  # the old minimum ages out of the window
        t.rtt("p", 2.0)
    assert t.to_json("p")["rtt_min_ms"] == 2.0


def test_link_table_probes_a_new_link_often_then_at_the_interval(monkeypatch):
    from edgemesh.mesh import links
    from edgemesh.mesh.links import EARLY_INTERVAL_S, EARLY_PROBES, LinkTable

    now = [1000.0]
    monkeypatch.setattr(links.time, "monotonic", lambda: now[0])
    t = LinkTable()
    assert t.needs_probe("p", 60.0)  # never seen
    t.set_path("p", "direct")
    assert t.needs_probe("p", 60.0)  # no figure yet
    for i in range(EARLY_PROBES):
        t.bandwidth("p", 1 << 20, 0.1, 0.01)
        now[0] += EARLY_INTERVAL_S / 2
        assert not t.needs_probe("p", 60.0)
        now[0] += EARLY_INTERVAL_S
        assert t.needs_probe("p", 60.0) == (i < EARLY_PROBES - 1)  # soon again, until there are enough
    now[0] += 60.0
    assert t.needs_probe("p", 60.0)
    t.set_path("p", None)
    assert not t.needs_probe("p", 60.0)  # no path: nothing to probe


def test_link_table_keeps_recent_path_changes_with_their_times():
    from edgemesh.mesh.links import HISTORY, LinkTable

    t = LinkTable()
    for path in ["relayed", "punched", None, "relayed"]:
        t.set_path("p", path)
    t.set_path("p", "relayed")  # no change: not recorded
    j = t.to_json("p")
    assert [p for _, p in j["history"]] == ["relayed", "punched", None, "relayed"]
    times = [ts for ts, _ in j["history"]]
    assert times == sorted(times) and times[-1] == j["since"]
    for _ in range(2 * HISTORY):
        t.set_path("p", "punched", fresh=True)
    assert len(t.to_json("p")["history"]) == HISTORY


def test_ranks_sharing_a_machine_get_disjoint_cores_only_when_there_are_enough():
    from edgemesh.runtime.cpu import cpu_slots

    two = [_member("a", "a"), _member("b", "b")]  # 2 cores, 2 ranks
    assert cpu_slots(two) == [(0, 2), (1, 2)]
    three = [_member(i, i) for i in "abc"]  # 2 cores, 3 ranks: the master alone on one, the others share the other
    assert cpu_slots(three) == [(0, 2), (1, 2), (1, 2)]
    five = [_member(i, i, cores=4) for i in "abcde"]  # 4 cores: parts 1.. taken in turn
    assert cpu_slots(five) == [(0, 4), (1, 4), (2, 4), (3, 4), (1, 4)]
    crowded = [_member(i, i, cores=1) for i in "abc"]  # one core for all: nothing to split
    assert cpu_slots(crowded) == [None, None, None]
    spread = [_member("a", "a", host="10.0.0.1"), _member("b", "b", host="10.0.0.2")]
    assert cpu_slots(spread) == [None, None]


def test_pinning_splits_the_allowed_cores_and_can_be_undone():
    import os
    import threading

    from edgemesh.runtime.cpu import _ALLOWED, pin_to_slot

    got: dict[str, object] = {}

    def body() -> None:  # on its own thread: pinning is per thread
        got["mine"] = pin_to_slot((1, 2))
        got["seen"] = tuple(sorted(os.sched_getaffinity(0)))
        got["undone"] = pin_to_slot(None)
        got["after"] = tuple(sorted(os.sched_getaffinity(0)))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    k = len(_ALLOWED) // 2
    if k == 0:
        assert got["mine"] == ()
    else:
        assert got["mine"] == got["seen"] == _ALLOWED[k:2 * k]
    assert got["after"] == _ALLOWED


def _paths(*pairs: tuple[str, str, str]) -> dict:
    out: dict = {}
    for a, b, path in pairs:
        out.setdefault(a, {})[b] = path
    return out


def test_a_tensor_parallel_group_takes_only_members_that_reach_each_other_directly():
    from edgemesh.placement.members import direct_island

    # a1 is the master; b2 is on its LAN; c3 sits behind a NAT (punched from a1); node3 is dead.
    paths = _paths(("a1", "b2", "lan"), ("b2", "a1", "lan"), ("a1", "c3", "punched"), ("c3", "a1", "direct"),
                   ("b2", "c3", "punched"), ("c3", "b2", "punched"))
    kept, left = direct_island(MEMBERS, "a1", paths)
    assert [m["id"] for m in kept] == ["a1", "b2", "d4"]  # the dead one stays: choose_members drops it
    assert left == {"c3": "node0 reaches node2 only punched"}
    # Both directions count: b2 reaches a1 directly but a1 has no path to b2 yet.
    paths["a1"]["b2"] = None
    assert direct_island(MEMBERS, "a1", paths)[1]["b2"] == "node0 reaches node1 over no path yet"
    # Pairs among the workers count too: c3 is direct with the master but only relayed with b2.
    paths = _paths(*[(x, y, "direct") for x in ("a1", "b2", "c3") for y in ("a1", "b2", "c3") if x != y])
    paths["c3"]["b2"] = "relayed"
    kept, left = direct_island(MEMBERS, "a1", paths)
    assert [m["id"] for m in kept] == ["a1", "b2", "d4"] and left == {"c3": "node2 reaches node1 only relayed"}
    # Without any path information nobody but the master can be placed.
    assert set(direct_island(MEMBERS, "a1", {})[1]) == {"b2", "c3"}


def test_naming_a_left_out_member_or_asking_for_more_than_the_island_is_refused_with_the_reason():
    from edgemesh.placement.members import refuse_left_out

    left = {"c3": "node0 reaches node2 only punched"}
    notes = ["node2: left out, node0 reaches node2 only punched"]
    with pytest.raises(ConfigError, match="node2 cannot be in a tensor-parallel group with this node: node0 reaches "
                                          "node2 only punched"):
        refuse_left_out(LaunchOptions(names=("node1", "node2")), MEMBERS, left, notes, can=2)
    with pytest.raises(ConfigError, match="c3 cannot be .*node0 reaches node2 only punched"):
        refuse_left_out(LaunchOptions(names=("c3",)), MEMBERS, left, notes, can=2)  # by id prefix too
    with pytest.raises(ConfigError, match="--nodes 3: only 2 member.*node2: left out, node0 reaches node2 only punched"):
        refuse_left_out(LaunchOptions(nodes=3), MEMBERS, left, notes, can=2)
    refuse_left_out(LaunchOptions(nodes=2), MEMBERS, left, notes, can=2)  # fits: no error
    refuse_left_out(LaunchOptions(names=("node1",)), MEMBERS, left, notes, can=2)


def test_members_named_with_on_are_tried_first_and_a_silent_member_is_named_as_such():
    from edgemesh.placement.members import direct_island

    # a1 reaches b2 and c3 directly, but b2 <-> c3 only punched: by name order b2 wins, but
    # `--on node2` (c3) must give the group {a1, c3}, not refuse c3 because of b2.
    paths = _paths(*[(x, y, "direct") for x in ("a1", "b2", "c3") for y in ("a1", "b2", "c3") if x != y])
    paths["b2"]["c3"] = paths["c3"]["b2"] = "punched"
    assert direct_island(MEMBERS, "a1", paths)[1] == {"c3": "node1 reaches node2 only punched"}
    assert direct_island(MEMBERS, "a1", paths, first=("c3",))[1] == {"b2": "node2 reaches node1 only punched"}
    # A member we reach directly but that never answered our status request is out, and says why.
    del paths["c3"]
    assert direct_island(MEMBERS, "a1", paths)[1] == {"c3": "node2 did not answer a status request"}


def test_the_groups_link_cost_is_loopbacks_on_one_machine_else_the_slowest_measured_link():
    from edgemesh.collective.costmodel import LOOPBACK_CURVE
    from edgemesh.placement.members import group_cost, one_machine

    def member(i: str, host: str, rtt: float | None = None, mbps: float | None = None) -> dict:
        m = _member(i, i, host=host)
        m["profile"].update(gflops=24.0, mem_bw_gbps=12.0, mem_total=8 << 30)
        if rtt is not None:
            m["links"] = {"path": "lan", "rtt_min_ms": rtt, "mbps": mbps}
        return m

    local = [member("a", "127.0.0.1"), member("b", "127.0.0.1", 0.3, 900.0), member("c", "127.0.0.1", 0.4, 700.0)]
    assert group_cost(local, *devices_and_links(local)) == LOOPBACK_CURVE
    lan = [member("a", "10.0.0.1"), member("b", "10.0.0.2", 2.0, 300.0), member("c", "10.0.0.3", 3.0, 250.0)]
    assert one_machine(local) and not one_machine(lan) and not one_machine(local[:2] + lan[2:])
    cost = group_cost(lan, *devices_and_links(lan))
    assert cost.a == pytest.approx(1.5e-3) and cost.b == pytest.approx(250e6 / 8)
    # A link not measured yet counts as the two devices' profiles say (1 Gbit/s by default).
    fresh = [member("a", "10.0.0.1"), member("b", "10.0.0.2", 2.0, 300.0), member("c", "10.0.0.3")]
    cost = group_cost(fresh, *devices_and_links(fresh))
    assert cost.a == pytest.approx(1e-3) and cost.b == pytest.approx(300e6 / 8)


def test_link_table_reports_the_best_recent_bandwidth_probe():
    from edgemesh.mesh.links import BANDWIDTH_WINDOW, LinkTable

    t = LinkTable()
    t.set_path("p", "lan")
    t.bandwidth("p", 1 << 20, 0.030, 0.002)  # ~300 Mbit/s
    t.bandwidth("p", 1 << 20, 1.000, 0.002)  # under-read: the link was busy
    assert t.to_json("p")["mbps"] == pytest.approx(299.6, abs=0.1)
    for _ in range(BANDWIDTH_WINDOW):  # the good probe ages out of the window
        t.bandwidth("p", 1 << 20, 0.100, 0.002)
    assert t.to_json("p")["mbps"] == pytest.approx(85.6, abs=0.1)
    t.set_path("p", "relayed")  # another path: its own probes only
    assert t.to_json("p")["mbps"] is None
