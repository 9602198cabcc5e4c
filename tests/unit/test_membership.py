from __future__ import annotations

import dataclasses
import time

import pytest

from edgemesh.clock import FakeClock
from edgemesh.config import MeshConfig
from edgemesh.errors import AuthError, ConfigError, ProtocolError
from edgemesh.identity.keys import NodeKey
from edgemesh.identity.statedir import ClusterInfo
from edgemesh.mesh.failure import FailureDetector
from edgemesh.identity.token import token_secret
from edgemesh.mesh.join import JoinService, pack_record
from edgemesh.mesh.join_proof import JoinChannel, client_mac, server_proof
from edgemesh.mesh.records import MemberRecord, admit, sign_self
from edgemesh.mesh.view import MembershipView

pytestmark = pytest.mark.unit


def make_record(cluster: ClusterInfo, key: NodeKey, version: int = 1, admitter: NodeKey | None = None, **kw) -> MemberRecord:
    r = MemberRecord(node_id=key.node_id, name=kw.pop("name", "n"), key=key.sign_public, version=version,
                     status=kw.pop("status", "member"), addresses=("tcp://127.0.0.1:1",), join=("tcp://127.0.0.1:2",), **kw)
    if admitter is not None:
        r = admit(cluster.cluster_id, admitter, r)
    return sign_self(cluster.cluster_id, key, r)


@pytest.fixture
def world():
    root = NodeKey.generate()
    _ROOTS[root.node_id] = root
    cluster = ClusterInfo("cid", root.node_id, b"S" * 32)
    view = MembershipView(cluster)
    view.merge([make_record(cluster, root, admitter=root)])
    return cluster, root, view


def test_newest_version_wins_and_merge_is_idempotent(world):
    cluster, root, view = world
    a = NodeKey.generate()
    v1 = make_record(cluster, a, 1, admitter=root, name="old")
    v2 = dataclasses.replace(v1, version=2, name="new")
    v2 = sign_self(cluster.cluster_id, a, v2)
    assert view.merge([v2, v1]) == [v2]
    assert view.merge([v1, v2]) == []
    assert view.get(a.node_id).name == "new"
    assert view.is_member_curve_key(a.curve_public)


def test_forged_records_are_refused(world):
    cluster, root, view = world
    a, mallory = NodeKey.generate(), NodeKey.generate()
    good = make_record(cluster, a, 1, admitter=root)
    # Another member tries to publish a newer version of a's record (redirect its traffic).
    forged = sign_self(cluster.cluster_id, mallory, dataclasses.replace(good, version=5, addresses=("tcp://evil:1",)))
    view.merge([good])
    assert view.merge([forged]) == []
    assert view.get(a.node_id).addresses == ("tcp://127.0.0.1:1",)
    # A self-admitted record of a non-root node is refused.
    rogue = make_record(cluster, mallory, 1, admitter=mallory)
    assert view.merge([rogue]) == []
    assert not view.is_member_curve_key(mallory.curve_public)
    assert view.rejected >= 2


def test_record_admitted_by_unknown_member_is_held_until_its_admitter_arrives(world):
    cluster, root, view = world
    b, c = NodeKey.generate(), NodeKey.generate()
    rb = make_record(cluster, b, 1, admitter=root)
    rc = make_record(cluster, c, 1, admitter=b)
    assert view.merge([rc]) == []
    assert view.get(c.node_id) is None
    changed = view.merge([rb])
    assert {r.node_id for r in changed} == {b.node_id, c.node_id}


def test_left_member_loses_access(world):
    cluster, root, view = world
    a = NodeKey.generate()
    rec = make_record(cluster, a, 1, admitter=root)
    view.merge([rec])
    gone = sign_self(cluster.cluster_id, a, dataclasses.replace(rec, version=2, status="left"))
    view.merge([gone])
    assert not view.is_member_curve_key(a.curve_public)
    assert a.node_id not in {r.node_id for r in view.members()}


def test_malformed_wire_records_are_skipped(world):
    _, _, view = world
    assert view.merge_wire([1, "x", {"id": "a"}, {"id": 1, "addr": "no"}]) == []
    assert view.rejected == 4


def test_failure_detector_alive_suspect_dead():
    clock = FakeClock()
    fd = FailureDetector(MeshConfig(), clock)
    assert fd.state("x") == "suspect"  # never heard since we started
    fd.heard("x")
    assert fd.state("x") == "alive"
    clock.advance(2.5)
    assert fd.state("x") == "suspect"
    clock.advance(2.0)
    assert fd.state("x") == "dead"
    fd.heard("x")
    assert fd.state("x") == "alive"


def test_mesh_config_validation_names_the_problem():
    with pytest.raises(ConfigError, match="suspect_after"):
        MeshConfig(suspect_after=10, dead_after=5)
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        MeshConfig.from_mapping({"bogus": 1}, "config.toml")
    with pytest.raises(ConfigError, match="must be a float"):
        MeshConfig.from_mapping({"dead_after": "soon"}, "config.toml")


# ---- join service --------------------------------------------------------------

@pytest.fixture
def service(world):
    cluster, root, view = world
    clock = FakeClock()
    admitted = []
    svc = JoinService(cluster, root, view, clock, admitted.append)
    return svc, cluster, view, clock, admitted


CNONCE = b"c" * 32
EXP = int(time.time()) + 3600  # the expiry of the joiner's token


def _challenge(cn=CNONCE, exp=EXP):
    return {"cnonce": cn, "exp": exp}


def _join_secret(cluster, exp=EXP):
    return token_secret(cluster.secret, cluster.cluster_id, exp)


def _register_body(cluster, nonce, joiner, secret=None, server=None, link_key=None):
    """A register for ``joiner`` on a link from ``link_key`` (default: the joiner's own key) to
    ``server`` (default: the root, which serves the join in these tests), keyed with the join
    secret of a token that expires at ``EXP`` unless ``secret`` is given."""
    packed = pack_record(make_record(cluster, joiner, int(time.time() * 1000)))
    server_key = (server.curve_public if server else _root_curve(cluster))
    channel = JoinChannel(cluster.cluster_id, server_key, link_key or joiner.curve_public, CNONCE, nonce)
    return {"nonce": nonce, "record": packed, "mac": client_mac(secret or _join_secret(cluster), channel, packed)}


_ROOTS: dict[str, NodeKey] = {}


def _root_curve(cluster):
    return _ROOTS[cluster.root].curve_public


def test_join_admits_a_node_that_knows_the_secret(service):
    svc, cluster, view, clock, admitted = service
    joiner = NodeKey.generate()
    ch = svc.challenge(joiner.curve_public, _challenge())
    assert ch["proof"] == server_proof(_join_secret(cluster), JoinChannel(
        cluster.cluster_id, _root_curve(cluster), joiner.curve_public, CNONCE, ch["nonce"]))
    reply = svc.register(joiner.curve_public, _register_body(cluster, ch["nonce"], joiner))
    assert view.is_member_curve_key(joiner.curve_public)
    assert len(admitted) == 1 and admitted[0].admitted_by == cluster.root
    assert reply["root"] == cluster.root and len(reply["records"]) == 2


def test_wrong_secret_replay_expiry_and_key_mismatch_are_refused_without_state_change(service):
    svc, cluster, view, clock, admitted = service
    joiner = NodeKey.generate()
    ch = svc.challenge(joiner.curve_public, _challenge())
    with pytest.raises(AuthError, match="does not match this cluster's secret"):
        svc.register(joiner.curve_public, _register_body(cluster, ch["nonce"], joiner, secret=b"W" * 32))
    # The nonce was consumed by the failed attempt: even the right MAC cannot reuse it.
    with pytest.raises(AuthError, match="already used"):
        svc.register(joiner.curve_public, _register_body(cluster, ch["nonce"], joiner))
    # A captured, valid register message replayed later is refused.
    ch = svc.challenge(joiner.curve_public, _challenge())
    body = _register_body(cluster, ch["nonce"], joiner)
    svc.register(joiner.curve_public, body)
    members_before = len(view.members())
    with pytest.raises(AuthError, match="replayed"):
        svc.register(joiner.curve_public, body)
    # Expired challenge.
    other = NodeKey.generate()
    ch = svc.challenge(other.curve_public, _challenge())
    clock.advance(31)
    with pytest.raises(AuthError, match="expired"):
        svc.register(other.curve_public, _register_body(cluster, ch["nonce"], other))
    # Registering a record whose key is not the link's key.
    ch = svc.challenge(other.curve_public, _challenge())
    with pytest.raises(AuthError, match="different key"):
        svc.register(NodeKey.generate().curve_public, _register_body(cluster, ch["nonce"], other))
    ch = svc.challenge(other.curve_public, _challenge())
    with pytest.raises(AuthError, match="not the key of this connection"):
        svc.register(other.curve_public, _register_body(cluster, ch["nonce"], NodeKey.generate(),
                                                        link_key=other.curve_public))
    assert len(view.members()) == members_before
    assert not view.is_member_curve_key(other.curve_public)
    assert len(admitted) == 1


def test_join_bodies_are_validated(service):
    svc, *_ = service
    with pytest.raises(ProtocolError):
        svc.challenge(b"k", {"cnonce": b"short"})
    with pytest.raises(ProtocolError):
        svc.challenge(b"k", ["not", "a", "map"])
    with pytest.raises(ProtocolError):
        svc.register(b"k", {"nonce": 5})
