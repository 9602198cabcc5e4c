"""check's tolerances and the state file, without root."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgemesh.testbed.check import judge, loss_ok, mbit_ok, rtt_ok, Target
from edgemesh.testbed.naming import Names
from edgemesh.testbed.probe import trimmed_mean
from edgemesh.testbed.scenario import LinkSpec
from edgemesh.testbed.shaping import End
from edgemesh.testbed.state import StateFile
from edgemesh.testbed.steps import Kind, Resource

pytestmark = pytest.mark.unit


def test_tolerances_match_the_issue() -> None:
    assert rtt_ok(40.0, 44.4) and not rtt_ok(40.0, 44.6)  # 10 % + 0.5 ms
    assert rtt_ok(1.0, 1.59) and not rtt_ok(1.0, 1.61)
    assert mbit_ok(300, 271) and not mbit_ok(300, 269)
    assert loss_ok(2.0, 2.9) and not loss_ok(2.0, 3.1)


def test_judge_reports_each_problem() -> None:
    t = Target("a->b", End("n1", "i1"), "10.0.0.2", End("n2", "i2"), "10.0.0.1",
               LinkSpec(up_mbit=50, down_mbit=50, delay_ms=20, loss_pct=2), upload=True)
    good = judge(t, 40.3, 49.0, 2.2)
    assert good.ok and good.want_rtt_ms == 40.0
    bad = judge(t, 50.0, 30.0, 5.0)
    assert not bad.ok and len(bad.problems) == 3


def test_trimmed_mean_drops_outliers() -> None:
    assert trimmed_mean([1.0] * 18 + [100.0, 0.0]) == 1.0


def test_state_file_records_before_and_survives_reload(tmp_path: Path) -> None:
    names = Names("tb9", tmp_path)
    sf = StateFile.create(names, "lan-4")
    sf.record(Resource(Kind.NETNS, "tb9-wan"))
    sf.record(Resource(Kind.NETNS, "tb9-wan"))  # idempotent
    loaded = StateFile.load(names)
    assert loaded is not None
    assert [r.name for r in loaded.state.of_kind(Kind.NETNS)] == ["tb9-wan"]
    assert loaded.state.of_kind(Kind.DIR)[0].name == str(names.run_dir)
    with pytest.raises(Exception, match="already exists"):
        StateFile.create(names, "lan-4")
