"""The pure launch step: from a daemon's status and the path map to the chosen members (master
first), the notes on who was left out, and whether to wait for paths or profiles."""

from __future__ import annotations

import pytest

from edgemesh.config import LaunchOptions
from edgemesh.errors import ConfigError
from edgemesh.placement.members import paths_pending, select_members

pytestmark = pytest.mark.unit


def _member(i: str, name: str, state: str = "alive", profiled: bool = True) -> dict:
    return {"id": i, "name": name, "state": state, "addresses": [f"tcp://10.0.0.{ord(i[0])}:7700"],
            "profile": {"cpu_logical": 2, **({"mem_total": 2**30} if profiled else {})}}


def _status(*members: dict) -> dict:
    return {"node": "a1", "members": list(members)}


def _direct(*ids: str) -> dict:
    return {x: {y: "lan" for y in ids if y != x} for x in ids}


def test_select_takes_the_direct_island_master_first_and_notes_who_is_left_out() -> None:
    status = _status(_member("c3", "node2"), _member("a1", "node0"), _member("b2", "node1"))
    paths = _direct("a1", "b2", "c3")
    paths["a1"]["c3"] = paths["c3"]["a1"] = "relayed"
    sel = select_members(status, paths, LaunchOptions())
    assert [m["name"] for m in sel.chosen] == ["node0", "node1"]
    assert sel.notes == ["node2: left out, node0 reaches node2 only relayed"] and sel.missing_profiles == []
    with pytest.raises(ConfigError, match="node2 cannot be in a tensor-parallel group"):
        select_members(status, paths, LaunchOptions(names=("node2",)))
    # After a failure (a member excluded) the launch takes what is left instead of refusing.
    sel = select_members(status, paths, LaunchOptions(nodes=3), excluded={"b2"})
    assert [m["name"] for m in sel.chosen] == ["node0"]


def test_select_reports_members_without_a_profile_and_pending_paths_are_seen() -> None:
    status = _status(_member("a1", "node0"), _member("b2", "node1", profiled=False))
    paths = _direct("a1", "b2")
    assert not paths_pending(status, paths)
    assert select_members(status, paths, LaunchOptions()).missing_profiles == ["node1"]
    paths["b2"]["a1"] = None  # b2 has not set up its path to us yet
    assert paths_pending(status, paths)
    del paths["b2"]  # b2 is reached directly but did not answer a status request
    assert paths_pending(status, paths)
