"""Which address of ours a member is told to dial (transport.addresses), and the CLI's progress
lines when stderr is not a terminal."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from edgemesh.cli.progress import PhaseProgress
from edgemesh.transport.addresses import address_for_peer, is_loopback, is_wildcard, source_address_towards

pytestmark = pytest.mark.unit

MINE = {"127.0.0.1", "::1", "192.168.1.5", "10.0.0.7"}


def test_a_member_on_another_machine_never_gets_loopback():
    got = address_for_peer("192.168.1.9", "0.0.0.0", "192.168.1.5", False, mine=MINE)
    assert not is_loopback(got)


def test_a_member_on_this_machine_may_use_loopback():
    assert address_for_peer("127.0.0.1", "0.0.0.0", "192.168.1.5", False, mine=MINE) == "127.0.0.1"
    assert address_for_peer("10.0.0.7", "0.0.0.0", "192.168.1.5", False, mine=MINE) == "127.0.0.1"


def test_an_explicit_advertise_wins_for_members_elsewhere():
    # e.g. a public address forwarded to this machine, which no local route names
    assert address_for_peer("198.51.100.4", "0.0.0.0", "203.0.113.10", True, mine=MINE) == "203.0.113.10"


def test_the_route_towards_the_member_picks_the_interface():
    # This machine's own route lookup: whatever it answers for 127.0.0.2 is loopback, so the
    # member counts as local; for a member elsewhere the routed address is used when it exists.
    routed = source_address_towards("192.0.2.77")
    got = address_for_peer("192.0.2.77", "0.0.0.0", "198.18.0.99", False, mine=MINE)
    assert got == (routed if routed and not is_loopback(routed) else "198.18.0.99")


def test_a_specific_listen_address_is_the_only_one():
    assert address_for_peer("192.168.1.9", "192.168.1.5", "192.168.1.5", False, mine=MINE) == "192.168.1.5"


def test_listening_on_loopback_refuses_a_member_elsewhere_with_the_reason():
    with pytest.raises(ValueError, match="listens on 127.0.0.1 only"):
        address_for_peer("192.168.1.9", "127.0.0.1", "127.0.0.1", False, mine=MINE)


def test_wildcards_and_loopbacks():
    assert is_wildcard("0.0.0.0") and is_wildcard("::") and not is_wildcard("10.0.0.1")
    assert is_loopback("127.0.0.5") and is_loopback("::1") and is_loopback("[::1]") and not is_loopback("10.0.0.1")
    assert source_address_towards("127.0.0.1") == "127.0.0.1"


def test_progress_without_a_terminal_prints_each_phase_and_throttles_counters():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=200)
    with PhaseProgress(console, "starting", every=3600) as p:
        p("asking the members for their status")
        p("workers fetching weights: 0/100 MB, 0/2 worker(s) ready")
        p("workers fetching weights: 50/100 MB, 0/2 worker(s) ready")  # same counter line: throttled
        p("forming the group [rank 1]")
    lines = buf.getvalue().splitlines()
    assert lines == ["… starting", "… asking the members for their status",
                     "… workers fetching weights: 0/100 MB, 0/2 worker(s) ready", "… forming the group [rank 1]"]
