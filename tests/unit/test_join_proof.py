"""Join proofs are bound to the link: a relayed join verifies nowhere (issue 18, item 2).

The client side (`join_client._handshake`) runs here against `JoinService` through a fake RPC
client, so a relay can be put between them without sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from edgemesh.clock import FakeClock
from edgemesh.errors import AuthError
from edgemesh.identity.keys import NodeKey
from edgemesh.identity.statedir import ClusterInfo
from edgemesh.identity.token import JoinPoint, JoinToken
from edgemesh.mesh import join_client
from edgemesh.mesh.join import JoinService
from edgemesh.mesh.join_proof import JoinChannel, check_reply, client_mac, server_proof, sign_reply
from edgemesh.mesh.records import MemberRecord, admit, sign_self
from edgemesh.mesh.view import MembershipView

pytestmark = [pytest.mark.unit, pytest.mark.security]

SECRET = b"S" * 32


def _record(cluster_id: str, key: NodeKey, admitter: NodeKey | None = None) -> MemberRecord:
    r = MemberRecord(node_id=key.node_id, name="n", key=key.sign_public, version=int(time.time() * 1000),
                     status="member", addresses=("tcp://127.0.0.1:1",), join=("tcp://127.0.0.1:2",))
    if admitter is not None:
        r = admit(cluster_id, admitter, r)
    return sign_self(cluster_id, key, r)


def _channel(**changes: object) -> JoinChannel:
    base = JoinChannel("cid", NodeKey.generate().curve_public, NodeKey.generate().curve_public, b"c" * 32, b"n" * 32)
    return dataclasses.replace(base, **changes) if changes else base


def test_changing_any_bound_field_breaks_both_proofs():
    ch = _channel()
    proof, mac = server_proof(SECRET, ch), client_mac(SECRET, ch, b"record")
    assert server_proof(SECRET, ch) == proof and client_mac(SECRET, ch, b"record") == mac
    other = NodeKey.generate().curve_public
    for changed in (dataclasses.replace(ch, cluster_id="cid2"), dataclasses.replace(ch, server_key=other),
                    dataclasses.replace(ch, client_key=other), dataclasses.replace(ch, cnonce=b"d" * 32),
                    dataclasses.replace(ch, nonce=b"m" * 32)):
        assert server_proof(SECRET, changed) != proof
        assert client_mac(SECRET, changed, b"record") != mac
    assert server_proof(b"T" * 32, ch) != proof
    assert client_mac(SECRET, ch, b"recorD") != mac
    assert server_proof(SECRET, ch) != client_mac(SECRET, ch, b"")  # one side's proof is not the other's


def test_the_reply_signature_covers_the_link_the_root_and_the_records():
    member = NodeKey.generate()
    ch = _channel()
    records = [{"id": "a", "v": 1}, {"id": "b", "v": 2}]
    sig = sign_reply(member, ch, "root", records)
    check_reply(member.sign_public, ch, "root", records, sig)
    bad = [
        (NodeKey.generate().sign_public, ch, "root", records),
        (member.sign_public, dataclasses.replace(ch, client_key=NodeKey.generate().curve_public), "root", records),
        (member.sign_public, dataclasses.replace(ch, nonce=b"m" * 32), "root", records),
        (member.sign_public, ch, "toor", records),
        (member.sign_public, ch, "root", records[:1]),
        (member.sign_public, ch, "root", [{"id": "a", "v": 1}, {"id": "b", "v": 3}]),
    ]
    for args in bad:
        with pytest.raises(AuthError, match="not signed by the member"):
            check_reply(*args, sig)


class _Direct:
    """An RPC client whose calls reach ``service`` on a link from ``link_key``."""

    def __init__(self, service: JoinService, link_key: bytes) -> None:
        self.service, self.link_key = service, link_key

    async def call(self, method: str, body: object, timeout: float = 3.0):
        handler = self.service.challenge if method == "join.challenge" else self.service.register
        return handler(self.link_key, body), []


@pytest.fixture
def cluster():
    root = NodeKey.generate()
    info = ClusterInfo("cid", root.node_id, SECRET)
    view = MembershipView(info)
    view.merge([_record("cid", root, admitter=root)])
    admitted: list[MemberRecord] = []
    service = JoinService(info, root, view, FakeClock(), admitted.append)
    token = JoinToken("cid", SECRET, (JoinPoint("tcp://127.0.0.1:7701", root.sign_public),))
    return root, view, service, token, admitted


def _handshake(client, joiner: NodeKey, token: JoinToken, point: JoinPoint):
    record = _record(token.cluster_id, joiner)
    return asyncio.run(join_client._handshake(client, joiner, token, record, point, 1.0))


def test_a_direct_join_verifies_and_adopts_only_verified_records(cluster):
    root, view, service, token, admitted = cluster
    joiner = NodeKey.generate()
    result = _handshake(_Direct(service, joiner.curve_public), joiner, token, token.points[0])
    assert result.cluster.root == root.node_id
    assert {r["id"] for r in result.records} == {root.node_id, joiner.node_id}
    assert len(admitted) == 1


def test_an_impostor_that_relays_the_challenge_to_a_real_member_gets_nothing(cluster):
    """The impostor announces its own key (as mDNS lets anyone do), the joiner dials it, and it
    passes the joiner's challenge on to the real member over its own link."""
    root, view, service, token, admitted = cluster
    impostor, joiner = NodeKey.generate(), NodeKey.generate()
    seen: list[str] = []

    class Relay:
        async def call(self, method: str, body: object, timeout: float = 3.0):
            seen.append(method)
            return await _Direct(service, impostor.curve_public).call(method, body)

    before = dict(view.records)
    with pytest.raises(AuthError, match="cannot prove it knows the cluster secret on this link"):
        _handshake(Relay(), joiner, token, JoinPoint("tcp://10.0.0.66:7701", impostor.sign_public))
    assert seen == ["join.challenge"]  # the joiner never sent its record or a MAC
    assert view.records == before and admitted == []


def test_a_forged_register_reply_is_refused(cluster):
    """Whoever answers register must sign the reply with the key the joiner dialled, over a view
    that verifies under its root and holds the token's keys, the member and our admission."""
    root, view, service, token, admitted = cluster
    joiner, impostor = NodeKey.generate(), NodeKey.generate()
    point = token.points[0]

    class Forger:
        """Passes the challenge through, then answers register itself with ``forge(reply)``."""

        def __init__(self, forge) -> None:
            self.forge, self.direct = forge, _Direct(service, joiner.curve_public)

        async def call(self, method: str, body: object, timeout: float = 3.0):
            reply, _ = await self.direct.call(method, body)
            if method == "join.register":
                self.channel = JoinChannel("cid", root.curve_public, joiner.curve_public,
                                           self.cnonce, body["nonce"])
                reply = self.forge(self, reply)
            else:
                self.cnonce = body["cnonce"]
            return reply, []

    def resign(f, reply, signer=root):
        reply["sig"] = sign_reply(signer, f.channel, reply["root"], reply["records"])
        return reply

    def impostor_root(f, reply):  # a view of its own making, rooted at the impostor
        records = [_record("cid", impostor, admitter=impostor).to_wire()]
        return resign(f, {"cluster": "cid", "root": impostor.node_id, "records": records}, signer=impostor)

    def unsigned_extra(f, reply):  # one more record slipped in after signing
        reply["records"].append(_record("cid", impostor, admitter=root).to_wire())
        return reply

    def bad_record(f, reply):  # a record that does not verify, signed over by the member
        forged = _record("cid", impostor, admitter=impostor).to_wire()
        return resign(f, {**reply, "records": reply["records"] + [forged]})

    def no_admission(f, reply):
        return resign(f, {**reply, "records": [r for r in reply["records"] if r["id"] != joiner.node_id]})

    for forge, message in ((impostor_root, "not signed by the member"), (unsigned_extra, "not signed by the member"),
                           (bad_record, "do not verify"), (no_admission, "without this node's admission")):
        with pytest.raises(AuthError, match=message):
            _handshake(Forger(forge), joiner, token, point)


def test_a_view_without_any_token_key_is_not_the_tokens_cluster(cluster):
    root, view, service, token, admitted = cluster
    other, joiner = NodeKey.generate(), NodeKey.generate()
    # A member admitted by the root answers, but the token names only a key the view lacks.
    stranger_token = JoinToken("cid", SECRET, (JoinPoint("tcp://127.0.0.1:1", NodeKey.generate().sign_public),))
    record = _record("cid", joiner, admitter=other)
    records = [r.to_wire() for r in view.records.values()] + [_record("cid", other, admitter=root).to_wire(),
                                                                record.to_wire()]
    point = JoinPoint("tcp://127.0.0.1:2", other.sign_public)
    with pytest.raises(AuthError, match="none of the token's members"):
        join_client.verified_view(stranger_token, point, record, root.node_id, records)
    assert len(join_client.verified_view(token, point, record, root.node_id, records)) == 3


def test_golden_vectors_of_the_join_handshake():
    """protocols/vectors/join.json: what protocols/wire.md specifies, byte for byte."""
    import json
    from pathlib import Path

    from edgemesh.mesh.join_proof import reply_message

    v = json.loads((Path(__file__).parents[2] / "protocols/vectors/join.json").read_text(encoding="utf-8"))
    server, client = NodeKey(bytes.fromhex(v["server_seed"])), NodeKey(bytes.fromhex(v["client_seed"]))
    assert server.curve_public.decode() == v["server_key"] and client.curve_public.decode() == v["client_key"]
    ch = JoinChannel(v["cluster_id"], server.curve_public, client.curve_public,
                     bytes.fromhex(v["cnonce"]), bytes.fromhex(v["nonce"]))
    secret, record = bytes.fromhex(v["secret"]), bytes.fromhex(v["record"])
    assert ch.transcript().hex() == v["transcript"]
    assert server_proof(secret, ch).hex() == v["proof"]
    assert client_mac(secret, ch, record).hex() == v["mac"]
    assert reply_message(ch, v["root"], v["records"]).hex() == v["reply_message"]
    assert sign_reply(server, ch, v["root"], v["records"]).hex() == v["sig"]
    check_reply(server.sign_public, ch, v["root"], v["records"], bytes.fromhex(v["sig"]))
