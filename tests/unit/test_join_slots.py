"""Open join challenges are shared per source address (issue 18, item 1): a stranger asking for
challenges in a loop evicts only its own, so a joiner elsewhere still completes its join."""

from __future__ import annotations

import time

import pytest

from edgemesh.clock import FakeClock
from edgemesh.identity.keys import NodeKey
from edgemesh.identity.statedir import ClusterInfo
from edgemesh.identity.token import token_secret
from edgemesh.mesh.join import MAX_CHALLENGES_PER_SOURCE, MAX_OPEN_CHALLENGES, JoinService, pack_record
from edgemesh.mesh.join_proof import JoinChannel, client_mac
from edgemesh.mesh.records import MemberRecord, admit, sign_self
from edgemesh.mesh.view import MembershipView

pytestmark = [pytest.mark.unit, pytest.mark.security]


def _record(key: NodeKey, admitter: NodeKey | None = None) -> MemberRecord:
    r = MemberRecord(key.node_id, "n", key.sign_public, int(time.time() * 1000), "member",
                     ("tcp://127.0.0.1:1",), ("tcp://127.0.0.1:2",))
    return sign_self("cid", key, admit("cid", admitter, r) if admitter else r)


def test_a_challenge_flood_from_one_address_does_not_evict_a_joiner_from_another():
    root = NodeKey.generate()
    cluster = ClusterInfo("cid", root.node_id, b"S" * 32)
    view = MembershipView(cluster)
    view.merge([_record(root, root)])
    service = JoinService(cluster, root, view, FakeClock(), lambda r: None)
    joiner = NodeKey.generate()
    cnonce, exp = b"c" * 32, int(time.time()) + 3600
    ch = service.challenge(joiner.curve_public, {"cnonce": cnonce, "exp": exp}, "192.0.2.10")
    # Thousands of strangers' keys from one address, and a few other addresses, ask in between.
    for i in range(3 * MAX_OPEN_CHALLENGES):
        service.challenge(NodeKey.generate().curve_public if i % 100 == 0 else b"k" * 40,
                          {"cnonce": cnonce, "exp": exp}, "198.51.100.66" if i % 50 else f"203.0.113.{i % 200}")
    assert len(service._open) <= MAX_OPEN_CHALLENGES
    assert service._per_source["198.51.100.66"] == MAX_CHALLENGES_PER_SOURCE
    packed = pack_record(_record(joiner))
    channel = JoinChannel("cid", root.curve_public, joiner.curve_public, cnonce, ch["nonce"])
    mac = client_mac(token_secret(cluster.secret, "cid", exp), channel, packed)
    service.register(joiner.curve_public, {"nonce": ch["nonce"], "record": packed, "mac": mac})
    assert view.is_member_curve_key(joiner.curve_public)
