"""Revocation rules (issue 18 item 3): a removal (tombstone) beats any version of the removed node's
record and voids what it admits from its removal epoch on, in whatever order gossip delivers
them; tokens expire and cannot be stretched; a rotated secret stops old tokens; rotations and
removals are only taken from whom they may come."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from edgemesh.clock import FakeClock
from edgemesh.config import MeshConfig
from edgemesh.errors import AuthError, TokenError
from edgemesh.identity.keys import NodeKey
from edgemesh.identity.statedir import ClusterInfo, StateDir
from edgemesh.identity.token import JoinPoint, JoinToken, parse_duration, token_secret
from edgemesh.mesh.join import JoinService, pack_record
from edgemesh.mesh.join_proof import JoinChannel, client_mac
from edgemesh.mesh.records import sign_self
from edgemesh.mesh.revocation import Removal, sign_removal, sign_rotation
from edgemesh.mesh.view import MembershipView

from .test_membership import make_record

pytestmark = [pytest.mark.unit, pytest.mark.security]


@pytest.fixture
def world():
    root = NodeKey.generate()
    cluster = ClusterInfo("cid", root.node_id, b"S" * 32)
    view = MembershipView(cluster)
    view.merge([make_record(cluster, root, admitter=root)])
    return cluster, root, view


def _admitted(cluster, key, admitter, epoch=0, version=1):
    r = make_record(cluster, key, version)
    from edgemesh.mesh.records import admit

    return sign_self(cluster.cluster_id, key, admit(cluster.cluster_id, admitter, r, epoch))


def test_a_removal_beats_any_later_version_of_the_removed_nodes_record(world):
    cluster, root, view = world
    x = NodeKey.generate()
    view.merge([_admitted(cluster, x, root)])
    assert view.is_member_curve_key(x.curve_public)
    assert view.merge_removals([sign_removal(cluster.cluster_id, root, x.node_id, view.epoch + 1)])
    assert view.epoch == 1
    assert not view.is_member_curve_key(x.curve_public)
    assert x.node_id not in {r.node_id for r in view.members()}
    # The removed node re-publishes itself, newer and signed by its own key: refused.
    newer = sign_self(cluster.cluster_id, x, dataclasses.replace(view.get(x.node_id), version=10**15))
    rejected = view.rejected
    assert view.merge([newer]) == []
    assert view.rejected == rejected + 1
    assert not view.is_member_curve_key(x.curve_public)
    # A node that left (its own removal) cannot come back either.
    y = NodeKey.generate()
    view.merge([_admitted(cluster, y, root)])
    view.merge_removals([sign_removal(cluster.cluster_id, y, y.node_id, view.epoch + 1)])
    back = sign_self(cluster.cluster_id, y, dataclasses.replace(view.get(y.node_id), version=10**15, status="member"))
    assert view.merge([back]) == [] and not view.is_member_curve_key(y.curve_public)


@pytest.mark.parametrize("removal_first", [True, False])
def test_admissions_by_a_removed_node_after_its_removal_are_void_in_any_order(world, removal_first):
    cluster, root, view = world
    x, before, after, grandchild = (NodeKey.generate() for _ in range(4))
    view.merge([_admitted(cluster, x, root)])
    removal = sign_removal(cluster.cluster_id, root, x.node_id, 3)
    early = _admitted(cluster, before, x, epoch=2)  # admitted while x was a member
    late = _admitted(cluster, after, x, epoch=3)  # admitted in the epoch x was removed in
    child = _admitted(cluster, grandchild, after, epoch=3)  # and what that one admitted in turn
    if removal_first:
        view.merge_removals([removal])
        view.merge([early, late, child])
    else:
        view.merge([early, late, child])
        assert view.is_member_curve_key(after.curve_public)
        view.merge_removals([removal])
    assert view.is_member_curve_key(before.curve_public)
    assert not view.is_member_curve_key(after.curve_public)
    assert not view.is_member_curve_key(grandchild.curve_public)
    assert view.get(after.node_id) is None and view.get(grandchild.node_id) is None


def test_removals_are_checked_held_until_the_signer_is_known_and_the_earliest_wins(world):
    cluster, root, view = world
    x, stranger, late_signer = NodeKey.generate(), NodeKey.generate(), NodeKey.generate()
    view.merge([_admitted(cluster, x, root)])
    forged = Removal(x.node_id, 1, root.node_id, stranger.sign(b"whatever"))
    assert view.merge_removals([forged]) == [] and view.is_member_curve_key(x.curve_public)
    # Signed by a member we have not heard of yet: held, applied once its record arrives.
    pending = sign_removal(cluster.cluster_id, late_signer, x.node_id, 5)
    assert view.merge_removals([pending]) == [] and view.is_member_curve_key(x.curve_public)
    view.merge([_admitted(cluster, late_signer, root)])
    assert view.merge_removals([]) == [pending]
    assert not view.is_member_curve_key(x.curve_public)
    # x's own later "removal" of itself cannot move its cut-off later; an earlier one can.
    view.merge_removals([sign_removal(cluster.cluster_id, x, x.node_id, 9)])
    assert view.removal(x.node_id).epoch == 5
    view.merge_removals([sign_removal(cluster.cluster_id, root, x.node_id, 2)])
    assert view.removal(x.node_id).epoch == 2
    assert view.epoch == 9  # the highest epoch of any removal seen
    assert len(view.removals_wire()) == 3  # all gossiped, so every member ends with the same epoch
    # A removal of a node no one knows waits (bounded) instead of growing the view.
    assert view.merge_removals([sign_removal(cluster.cluster_id, root, "ab" * 10, 10)]) == []
    assert len(view.removals_wire()) == 3 and view.epoch == 9


EXP = int(time.time()) + 3600


def _join(svc, cluster, joiner, exp=EXP, secret=None):
    ch = svc.challenge(joiner.curve_public, {"cnonce": b"c" * 32, "exp": exp})
    packed = pack_record(make_record(cluster, joiner, int(time.time() * 1000)))
    key = secret or token_secret(cluster.secret, cluster.cluster_id, exp)
    channel = JoinChannel(cluster.cluster_id, svc.key.curve_public, joiner.curve_public, b"c" * 32, ch["nonce"])
    return svc.register(joiner.curve_public, {"nonce": ch["nonce"], "record": packed,
                                              "mac": client_mac(key, channel, packed)})


def test_join_refuses_removed_keys_and_a_removed_member_admits_no_one(world):
    cluster, root, view = world
    svc = JoinService(cluster, root, view, FakeClock(), lambda r: None)
    x = NodeKey.generate()
    reply = _join(svc, cluster, x)
    assert reply["secret"] == cluster.secret  # the joiner learns the cluster secret only now
    assert view.get(x.node_id).admission_epoch == 0
    view.merge_removals([sign_removal(cluster.cluster_id, root, x.node_id, 1)])
    with pytest.raises(AuthError, match="removed from the cluster"):
        _join(svc, cluster, x)
    y = NodeKey.generate()
    _join(svc, cluster, y)
    assert view.get(y.node_id).admission_epoch == 1  # admissions carry the epoch they were made in
    # The member itself removed: it refuses to admit anyone.
    other = NodeKey.generate()
    view_y = MembershipView(cluster)
    view_y.merge(list(view.records.values()))
    view_y.merge_removals([sign_removal(cluster.cluster_id, root, y.node_id, 2)])
    svc_y = JoinService(cluster, y, view_y, FakeClock(), lambda r: None)
    with pytest.raises(AuthError, match="was removed from the cluster and admits no one"):
        _join(svc_y, cluster, other)


def test_durations_for_ttl():
    assert parse_duration("30m") == 1800
    assert parse_duration("24h") == 86400
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("90") == 90
    assert parse_duration("1.5h") == 5400
    for bad in ("", "h", "-1h", "0", "5y", "400d", "1 2h"):
        with pytest.raises(TokenError):
            parse_duration(bad)


def test_tokens_expire_cannot_be_stretched_and_die_with_a_rotated_secret(world):
    cluster, root, view = world
    now = time.time()
    clock_now = [now]
    svc = JoinService(cluster, root, view, FakeClock(), lambda r: None, wall=lambda: clock_now[0])
    token = JoinToken.issue(cluster.cluster_id, cluster.secret, (JoinPoint("tcp://x:1", root.sign_public),), ttl=600, now=now)
    assert JoinToken.decode(token.encode()) == token
    assert token.secret != cluster.secret  # the token never carries the cluster secret
    _join(svc, cluster, NodeKey.generate(), exp=token.expires, secret=token.secret)
    # Expired: refused before any MAC is looked at, with the expiry in the message.
    clock_now[0] = now + 601
    with pytest.raises(AuthError, match="the token expired at"):
        _join(svc, cluster, NodeKey.generate(), exp=token.expires, secret=token.secret)
    # Claiming a later expiry with the same token's secret fails the proof.
    with pytest.raises(AuthError, match="does not match"):
        _join(svc, cluster, NodeKey.generate(), exp=token.expires + 3600, secret=token.secret)
    # After a rotation, a fresh (unexpired) old token no longer admits.
    clock_now[0] = now
    svc.cluster = cluster.rotated(b"N" * 32, 1, root.node_id, b"")
    with pytest.raises(AuthError, match="does not match"):
        _join(svc, cluster, NodeKey.generate(), exp=token.expires, secret=token.secret)
    fresh = JoinToken.issue(cluster.cluster_id, b"N" * 32, token.points, ttl=600, now=now)
    _join(svc, cluster, NodeKey.generate(), exp=fresh.expires, secret=fresh.secret)


def _daemon(tmp_path: Path, name: str, cluster: ClusterInfo | None = None, key: NodeKey | None = None):
    from edgemesh.runtime.daemon import NodeDaemon

    sd = StateDir(tmp_path / name)
    k, _ = sd.load_or_create_identity(name)
    if cluster is None:
        cluster = sd.new_cluster(k.node_id)
    else:
        sd.save_cluster(cluster)
    d = NodeDaemon(sd, "127.0.0.1", 7700, config=MeshConfig(mdns=False))
    return d, k, sd


def test_a_rotation_is_taken_only_from_a_current_member_and_only_if_newer(tmp_path):
    d, root, sd = _daemon(tmp_path, "root")
    try:
        m = d.membership
        m.open([], {})
        cluster = d.node.cluster
        stranger = NodeKey.generate()
        m.merge_rotation(sign_rotation(cluster.cluster_id, stranger, b"A" * 32, 1).to_wire())
        assert d.node.cluster.secret == cluster.secret  # not a member
        m.merge_rotation(sign_rotation(cluster.cluster_id, root, b"B" * 32, 7).to_wire())
        assert d.node.cluster.secret == cluster.secret  # an epoch from a future we have not seen
        rot = sign_rotation(cluster.cluster_id, root, b"C" * 32, 1)
        m.merge_rotation(rot.to_wire())
        assert d.node.cluster.secret == b"C" * 32 and d.node.cluster.secret_epoch == 1
        assert m.join_service.cluster.secret == b"C" * 32
        assert sd.load_cluster().secret == b"C" * 32 and m.view.epoch == 1  # saved, and the epoch moved
        assert m.gossip_body()["secret"] == rot.to_wire()
        m.merge_rotation(sign_rotation(cluster.cluster_id, root, b"D" * 32, 1).to_wire() | {"sig": b"x" * 64})
        assert d.node.cluster.secret == b"C" * 32
        # The node's own key may call anything; another key nothing once it is not a member.
        assert m.authorize(root.curve_public, "admin.rotate")
        assert not m.authorize(stranger.curve_public, "ping")
    finally:
        d.node.transport.close()


def test_leaving_gives_the_device_a_new_key_and_keeps_its_name(tmp_path):
    sd = StateDir(tmp_path / "n")
    key, _ = sd.load_or_create_identity("alpha")
    sd.new_cluster(key.node_id)
    sd.forget_cluster()
    new, name = sd.load_identity()
    assert name == "alpha" and new.node_id != key.node_id and sd.load_cluster() is None


def test_a_removed_node_still_knows_it_after_a_restart(tmp_path):
    d, root, sd = _daemon(tmp_path, "root")
    try:
        d.membership.open([], {})
        cluster = d.node.cluster
        x = NodeKey.generate()
        view = d.membership.view
        view.merge([_admitted(cluster, x, root)])
        # What a member's view cache holds after x was removed, as x's own daemon saves it.
        view.merge_removals([sign_removal(cluster.cluster_id, root, x.node_id, 1)])
        saved = (view.to_wire(), view.removals_wire())
    finally:
        d.node.transport.close()
    xd = StateDir(tmp_path / "x")
    xd.ensure()
    xd._write_json(StateDir.IDENTITY, {"version": 1, "seed": x.seed.hex(), "name": "x"}, secret=True)
    xd.save_cluster(cluster)
    xd.save_members(*saved)
    from edgemesh.runtime.daemon import NodeDaemon

    again = NodeDaemon(xd, "127.0.0.1", 7700, config=MeshConfig(mdns=False))
    try:
        again.membership.open([], {})
        assert again.membership.removed is not None and again.membership.removed.by == root.node_id
        assert again.membership.removal_json()["removed"]["by_name"] == "root"
        assert not again.membership.view.is_member_curve_key(x.curve_public)
        assert again.membership.admits_connection(x.curve_public)  # its own CLI still reaches it
    finally:
        again.node.transport.close()
