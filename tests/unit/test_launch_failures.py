"""How a launch names what went wrong: worker reports with member names for the ranks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from edgemesh.runtime.deploy import Deployment

pytestmark = pytest.mark.unit


def test_both_ends_of_a_failed_link_are_named_with_the_address():
    d = Deployment.__new__(Deployment)
    d.members = [{"name": "alpha"}, {"name": "gamma"}, {"name": "beta"}]
    job = SimpleNamespace(failure="x", failures=[
        "rank 1: could not join the group: group did not form in time; no handshake from ranks [2] (a firewall?)",
        "rank 2: could not join the group: no handshake with rank 1 at tcp://198.18.0.4:42135"])
    assert d._worker_failure(job) == (
        "gamma (rank 1): could not join the group: group did not form in time; no handshake from beta (rank 2) "
        "(a firewall?); beta (rank 2): could not join the group: no handshake with gamma (rank 1) at "
        "tcp://198.18.0.4:42135")
    assert d._worker_failure(SimpleNamespace(failure=None, failures=[])) is None
