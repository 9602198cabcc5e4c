"""`testbed check` on the shipped scenarios: every shaped link within the issue's tolerances."""

from __future__ import annotations

import pytest

from edgemesh.testbed.build import layout
from edgemesh.testbed.check import run_check

from .conftest import REPO

pytestmark = pytest.mark.testbed


@pytest.mark.parametrize("name", ["lan-4", "home-wan"])
def test_check_passes_on_shipped_scenario(name: str, bring_up, caps) -> None:  # type: ignore[no-untyped-def]
    bed = bring_up(REPO / "emulation" / f"{name}.toml")
    # A measurement, so a host busy with other work can spoil one (CI at load 12 saw 429 of
    # 500 Mbit/s, and 2 % ping loss from starved pingers): measure up to 3 times. Shaping that
    # is really wrong fails all three.
    for _ in range(3):
        ok, results = run_check(layout(bed.scenario, bed.names, caps), bed.state, caps.python)
        if ok:
            break
    bad = [(r.link, r.problems) for r in results if not r.ok]
    assert ok, f"links out of tolerance in 3 measurements, the last: {bad}"
    # Every shaped link was measured in both directions, with real numbers.
    assert len(results) == 2 * sum(1 for link in layout(bed.scenario, bed.names, caps).links if link.spec.up_mbit)
    assert all(r.got_mbit for r in results)
