"""Join proofs are bound to the link: a relayed join verifies nowhere (issue 18, item 2).

The client side (`join_client._handshake`) runs here against `JoinService` through a fake RPC
client, so a relay can be put between them without sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import time
from pathlib import Path

import msgpack

import pytest

from edgemesh.clock import FakeClock
from edgemesh.errors import AuthError
from edgemesh.identity.keys import NodeKey
from edgemesh.identity.statedir import ClusterInfo
from edgemesh.identity.token import JoinPoint, JoinToken, token_secret
from edgemesh.mesh import join_client
from edgemesh.mesh.join import JoinService
from edgemesh.mesh.join_proof import (JoinChannel, JoinReply, check_reply, client_mac, reply_message, server_proof,
                                      sign_reply)
from edgemesh.mesh.revocation import sign_removal, sign_rotation
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


def test_the_reply_signature_covers_the_link_the_view_and_the_cluster_secret():
    member = NodeKey.generate()
    ch = _channel()
    reply = JoinReply("root", [{"id": "a", "v": 1}, {"id": "b", "v": 2}], [{"id": "a", "e": 1}], SECRET,
                      2, "b", b"r" * 64)
    sig = sign_reply(member, ch, reply)
    check_reply(member.sign_public, ch, reply, sig)
    change = functools.partial(dataclasses.replace, reply)
    bad = [
        (NodeKey.generate().sign_public, ch, reply),
        (member.sign_public, dataclasses.replace(ch, client_key=NodeKey.generate().curve_public), reply),
        (member.sign_public, dataclasses.replace(ch, nonce=b"m" * 32), reply),
        (member.sign_public, ch, change(root="toor")),
        (member.sign_public, ch, change(records=reply.records[:1])),
        (member.sign_public, ch, change(records=[{"id": "a", "v": 1}, {"id": "b", "v": 3}])),
        (member.sign_public, ch, change(removals=[])),
        (member.sign_public, ch, change(removals=[{"id": "a", "e": 2}])),
        (member.sign_public, ch, change(secret=b"T" * 32)),
        (member.sign_public, ch, change(secret_epoch=3)),
        (member.sign_public, ch, change(rotated_by="a")),
        (member.sign_public, ch, change(rotation_sig=b"s" * 64)),
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
    token = JoinToken.issue("cid", SECRET, (JoinPoint("tcp://127.0.0.1:7701", root.sign_public),))
    return root, view, service, token, admitted


def _handshake(client, joiner: NodeKey, token: JoinToken, point: JoinPoint):
    record = _record(token.cluster_id, joiner)
    return asyncio.run(join_client._handshake(client, joiner, token, record, point, 1.0))


def test_a_direct_join_verifies_and_adopts_only_verified_records(cluster):
    root, view, service, token, admitted = cluster
    joiner = NodeKey.generate()
    result = _handshake(_Direct(service, joiner.curve_public), joiner, token, token.points[0])
    assert result.cluster.root == root.node_id
    assert result.cluster.secret == SECRET and token.secret != SECRET  # the token held only a join secret
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
        reply["sig"] = sign_reply(signer, f.channel, JoinReply.from_wire(reply))
        return reply

    def impostor_root(f, reply):  # a view of its own making, rooted at the impostor
        records = [_record("cid", impostor, admitter=impostor).to_wire()]
        return resign(f, {**reply, "root": impostor.node_id, "records": records}, signer=impostor)

    def unsigned_extra(f, reply):  # one more record slipped in after signing
        reply["records"].append(_record("cid", impostor, admitter=root).to_wire())
        return reply

    def bad_record(f, reply):  # a record that does not verify, signed over by the member
        forged = _record("cid", impostor, admitter=impostor).to_wire()
        return resign(f, {**reply, "records": reply["records"] + [forged]})

    def no_admission(f, reply):
        return resign(f, {**reply, "records": [r for r in reply["records"] if r["id"] != joiner.node_id]})

    def swapped_secret(f, reply):  # the secret replaced on the way, signature left as it was
        return {**reply, "secret": b"T" * 32}

    def other_secret(f, reply):  # a member that signs a secret other than the token's
        return resign(f, {**reply, "secret": b"T" * 32})

    def unsigned_removal(f, reply):  # a removal slipped in after signing
        return {**reply, "removals": [sign_removal("cid", root, joiner.node_id, 1).to_wire()]}

    for forge, message in ((impostor_root, "not signed by the member"), (unsigned_extra, "not signed by the member"),
                           (bad_record, "do not verify"), (no_admission, "without this node's admission"),
                           (swapped_secret, "not signed by the member"),
                           (other_secret, "not the one the token was made from"),
                           (unsigned_removal, "not signed by the member")):
        with pytest.raises(AuthError, match=message):
            _handshake(Forger(forge), joiner, token, point)


def test_the_joiner_gets_the_removals_and_the_secret_the_member_holds_now(cluster):
    """The reply hands over removals and the rotated cluster secret (signed, checked against the
    token); a rotation between challenge and register ends the join before anyone is admitted."""
    root, view, service, token, admitted = cluster
    gone = NodeKey.generate()
    view.merge([_record("cid", gone, admitter=root)])
    view.merge_removals([sign_removal("cid", root, gone.node_id, 1)])
    rotated = sign_rotation("cid", root, b"N" * 32, 2)
    service.cluster = service.cluster.rotated(rotated.secret, rotated.epoch, rotated.by, rotated.sig)
    fresh = JoinToken.issue("cid", b"N" * 32, token.points)
    joiner = NodeKey.generate()
    result = _handshake(_Direct(service, joiner.curve_public), joiner, fresh, fresh.points[0])
    assert (result.cluster.secret, result.cluster.secret_epoch, result.cluster.rotation_sig) == \
        (b"N" * 32, 2, rotated.sig)
    assert [r["id"] for r in result.removals] == [gone.node_id]
    # The old token (made before the rotation) no longer gets a proof out of the member.
    with pytest.raises(AuthError, match="cannot prove it knows the cluster secret"):
        _handshake(_Direct(service, joiner.curve_public), NodeKey.generate(), token, token.points[0])

    class RotatesMidway(_Direct):
        async def call(self, method: str, body: object, timeout: float = 3.0):
            reply = await super().call(method, body, timeout)
            if method == "join.challenge":
                again = sign_rotation("cid", root, b"M" * 32, 3)
                self.service.cluster = self.service.cluster.rotated(again.secret, again.epoch, again.by, again.sig)
            return reply

    late = NodeKey.generate()
    before = len(admitted)
    with pytest.raises(AuthError, match="rotated during this join"):
        _handshake(RotatesMidway(service, late.curve_public), late, fresh, fresh.points[0])
    assert len(admitted) == before and view.get(late.node_id) is None


def test_a_view_without_any_token_key_is_not_the_tokens_cluster(cluster):
    root, view, service, token, admitted = cluster
    other, joiner = NodeKey.generate(), NodeKey.generate()
    # A member admitted by the root answers, but the token names only a key the view lacks.
    stranger_token = JoinToken.issue("cid", SECRET, (JoinPoint("tcp://127.0.0.1:1", NodeKey.generate().sign_public),))
    record = _record("cid", joiner, admitter=other)
    records = [r.to_wire() for r in view.records.values()] + [_record("cid", other, admitter=root).to_wire(),
                                                                record.to_wire()]
    point = JoinPoint("tcp://127.0.0.1:2", other.sign_public)
    with pytest.raises(AuthError, match="none of the token's members"):
        join_client.verified_view(stranger_token, point, record, root.node_id, records)
    assert len(join_client.verified_view(token, point, record, root.node_id, records)) == 3


VECTORS = Path(__file__).parents[2] / "protocols/vectors/join.json"


def join_vectors() -> dict:
    """protocols/vectors/join.json as this code computes it, from fixed inputs (ed25519 signatures
    are deterministic). Rewrite the file with ``python tests/unit/test_join_proof.py --write``."""
    cid, cluster_secret, exp = "c0ffee", bytes([0x53]) * 32, 1_900_000_000
    server, client = NodeKey(bytes(range(32))), NodeKey(bytes(range(32, 64)))
    cnonce, nonce = bytes([1]) * 32, bytes([2]) * 32
    join_secret = token_secret(cluster_secret, cid, exp)
    ch = JoinChannel(cid, server.curve_public, client.curve_public, cnonce, nonce)
    record = msgpack.packb({"id": client.node_id[:20]}, use_bin_type=True)
    rotation = sign_rotation(cid, server, cluster_secret, 2)
    removal = sign_removal(cid, server, client.node_id[:20], 2)
    reply = JoinReply(server.node_id[:20], [{"id": server.node_id[:20], "v": 1}], [removal.to_wire()],
                      cluster_secret, rotation.epoch, rotation.by, rotation.sig)
    hexed = lambda x: x.hex() if isinstance(x, bytes) else x  # noqa: E731
    wire = {k: hexed(v) for k, v in reply.to_wire().items()}
    wire["removals"] = [{k: hexed(v) for k, v in rm.items()} for rm in reply.removals]
    return {
        "_comment": "protocols/wire.md, Join handshake: token join secret, transcript, proofs and the signed "
                    "register reply. Keys are NodeKey(seed); z85 CURVE keys are ASCII; bytes are hex. Written by "
                    "tests/unit/test_join_proof.py (join_vectors), which checks this file against the code.",
        "cluster_id": cid, "cluster_secret": cluster_secret.hex(), "exp": exp, "join_secret": join_secret.hex(),
        "server_seed": bytes(range(32)).hex(), "client_seed": bytes(range(32, 64)).hex(),
        "server_key": server.curve_public.decode(), "client_key": client.curve_public.decode(),
        "cnonce": cnonce.hex(), "nonce": nonce.hex(), "transcript": ch.transcript().hex(),
        "proof": server_proof(join_secret, ch).hex(), "record": record.hex(),
        "mac": client_mac(join_secret, ch, record).hex(),
        "reply": wire,
        "reply_message": reply_message(ch, reply).hex(), "sig": sign_reply(server, ch, reply).hex(),
    }


def test_golden_vectors_of_the_join_handshake():
    """protocols/vectors/join.json: what protocols/wire.md specifies, byte for byte."""
    v = json.loads(VECTORS.read_text(encoding="utf-8"))
    assert v == json.loads(json.dumps(join_vectors())), "join.json differs from what the code computes"
    # And the file on its own terms, as an implementation elsewhere would read it:
    server, client = NodeKey(bytes.fromhex(v["server_seed"])), NodeKey(bytes.fromhex(v["client_seed"]))
    assert server.curve_public.decode() == v["server_key"] and client.curve_public.decode() == v["client_key"]
    join_secret = token_secret(bytes.fromhex(v["cluster_secret"]), v["cluster_id"], v["exp"])
    assert join_secret.hex() == v["join_secret"]
    ch = JoinChannel(v["cluster_id"], server.curve_public, client.curve_public,
                     bytes.fromhex(v["cnonce"]), bytes.fromhex(v["nonce"]))
    record = bytes.fromhex(v["record"])
    assert ch.transcript().hex() == v["transcript"]
    assert server_proof(join_secret, ch).hex() == v["proof"]
    assert client_mac(join_secret, ch, record).hex() == v["mac"]
    r = v["reply"]
    reply = JoinReply(r["root"], r["records"], [{**rm, "sig": bytes.fromhex(rm["sig"])} for rm in r["removals"]],
                      bytes.fromhex(r["secret"]), r["secret_epoch"], r["rotated_by"], bytes.fromhex(r["rotation_sig"]))
    assert reply_message(ch, reply).hex() == v["reply_message"]
    check_reply(server.sign_public, ch, reply, bytes.fromhex(v["sig"]))


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--write"]:
        VECTORS.write_text(json.dumps(join_vectors(), indent=1) + "\n", encoding="utf-8")
    else:
        print(json.dumps(join_vectors(), indent=1))
