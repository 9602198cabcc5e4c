"""Security: unknown keys get no service, bad tokens and replays are refused, fuzzed frames
never hurt the daemon, user mistakes give one-line errors."""

from __future__ import annotations

import asyncio
import random
import socket
import time

import msgpack
import pytest
import zmq

from edgemesh.errors import RpcError, RpcTimeout
from edgemesh.identity.keys import NodeKey
from edgemesh.identity.token import JoinPoint, JoinToken, token_secret
from edgemesh.mesh.join import pack_record
from edgemesh.mesh.join_proof import JoinChannel, client_mac
from edgemesh.mesh.records import MemberRecord, sign_self
from edgemesh.mesh.rpc import RpcClient
from edgemesh.runtime.control import control, control_call
from edgemesh.transport.zmq_link import ZmqTransport
from edgemesh.wire.envelope import Envelope, Kind, encode_envelope

from .conftest import run_cli, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.security]


def _endpoints(nodes, i):
    return f"tcp://127.0.0.1:{nodes[i].port}", f"tcp://127.0.0.1:{nodes[i].port + 1}"


# Calls that must be answered get a long timeout (a loaded host may take seconds for the CURVE
# handshake and the reply: 1.5 s turned an expected RpcError into an RpcTimeout); only the call
# whose expected outcome *is* the timeout passes a short one.
async def _call_as(key: NodeKey, endpoint: str, server_key: bytes, method: str, body=None, timeout=20.0):
    transport = ZmqTransport(key)
    try:
        client = RpcClient(transport.client(endpoint, server_key), bytes.fromhex(key.node_id))
        reader = asyncio.ensure_future(client.run())
        try:
            return await client.call(method, body, timeout=timeout)
        finally:
            reader.cancel()
    finally:
        transport.close()


def test_unregistered_key_gets_no_service(cluster3):
    d, sds, nodes = cluster3
    root_key, _ = sds[0].load_identity()
    before = control(sds[0], "status")["stats"]["refused_connections"]
    stranger = NodeKey.generate()
    mesh, join = _endpoints(nodes, 0)
    with pytest.raises(RpcTimeout):
        asyncio.run(_call_as(stranger, mesh, root_key.curve_public, "status", timeout=1.5))
    # Counted when the daemon's authenticator handles the handshake, which a loaded host may do
    # after the client has given up: wait for it.
    assert wait_for(lambda: control(sds[0], "status")["stats"]["refused_connections"] > before, 30)
    # The join port lets the stranger in, but serves nothing except the join methods.
    with pytest.raises(RpcError, match="no method 'status'"):
        asyncio.run(_call_as(stranger, join, root_key.curve_public, "status"))
    # A member key may not use another node's admin methods.
    member_key, _ = sds[1].load_identity()
    with pytest.raises(RpcError, match="no method 'admin.stop'"):
        asyncio.run(_call_as(member_key, mesh, root_key.curve_public, "admin.stop"))
    assert control(sds[0], "status")["node"] == root_key.node_id


def test_wrong_token_is_refused_with_a_clear_cli_error(cluster3, tmp_path):
    d, sds, nodes = cluster3
    cluster = sds[0].require_cluster()
    root_key, _ = sds[0].load_identity()
    _, join = _endpoints(nodes, 0)
    bad = JoinToken.issue(cluster.cluster_id, b"x" * 32, (JoinPoint(join, root_key.sign_public),)).encode()
    res = run_cli("join", bad, "--state-dir", str(tmp_path / "n"), "--host", "127.0.0.1",
                  "--port", "31700", "--no-mdns", home=tmp_path)
    assert res.returncode == 3
    assert "secret" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert len(control(sds[0], "status")["members"]) == 3


def test_replayed_join_is_refused_and_changes_nothing(cluster3):
    d, sds, nodes = cluster3
    cluster = sds[0].require_cluster()
    root_key, _ = sds[0].load_identity()
    _, join = _endpoints(nodes, 0)
    joiner = NodeKey.generate()

    async def scenario():
        transport = ZmqTransport(joiner)
        try:
            client = RpcClient(transport.client(join, root_key.curve_public), bytes.fromhex(joiner.node_id))
            reader = asyncio.ensure_future(client.run())
            exp = int(time.time()) + 60
            ch, _ = await client.call("join.challenge", {"cnonce": b"c" * 32, "exp": exp})
            rec = sign_self(cluster.cluster_id, joiner, MemberRecord(
                joiner.node_id, "joiner", joiner.sign_public, int(time.time() * 1000), "member",
                ("tcp://127.0.0.1:1",), ("tcp://127.0.0.1:2",)))
            packed = pack_record(rec)
            channel = JoinChannel(cluster.cluster_id, root_key.curve_public, joiner.curve_public, b"c" * 32, ch["nonce"])
            body = {"nonce": ch["nonce"], "record": packed,
                    "mac": client_mac(token_secret(cluster.secret, cluster.cluster_id, exp), channel, packed)}
            await client.call("join.register", body)
            n_after_join = len((await control_call(sds[0], "status"))["members"])
            with pytest.raises(RpcError, match="replayed"):
                await client.call("join.register", body)
            reader.cancel()
            return n_after_join
        finally:
            transport.close()

    before = control(sds[0], "status")
    n_after_join = asyncio.run(scenario())
    after = control(sds[0], "status")
    assert n_after_join == len(before["members"]) + 1
    assert len(after["members"]) == n_after_join
    assert after["stats"]["refused_joins"] == before["stats"]["refused_joins"] + 1


def _mutations(rng: random.Random):
    seeds = [
        encode_envelope(Envelope(Kind.REQUEST, "status", 1, b"x", {})),
        encode_envelope(Envelope(Kind.REQUEST, "gossip.sync", 2, b"x", {"records": [{"id": "a"}]})),
        encode_envelope(Envelope(Kind.NOTIFY, "gossip.push", 0, b"x", {"records": [1, 2]})),
        encode_envelope(Envelope(Kind.REQUEST, "join.register", 3, b"x", {"nonce": b"n", "record": b"\x80", "mac": b""})),
        encode_envelope(Envelope(Kind.REQUEST, "join.challenge", 4, b"x", {"cnonce": b"c" * 32, "exp": 2**40})),
    ]
    while True:
        r = rng.random()
        if r < 0.3:
            yield [bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 80)))]
        elif r < 0.4:
            yield [rng.choice(seeds)] + [b"\0" * rng.randrange(0, 9) for _ in range(rng.randrange(1, 3))]
        elif r < 0.5:
            yield [msgpack.packb([1, rng.randrange(0, 4), rng.choice(["status", "gossip.sync", "join.register", "ping"]),
                                  rng.randrange(0, 5), b"", rng.choice([None, 1, "s", [1], {"records": "x"}, {"nonce": 3}]),
                                  rng.choice([[], [["float32", [rng.randrange(-2, 5)]]]])])]
        else:
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 5)):
                pos = rng.randrange(len(data))
                data[pos] = rng.getrandbits(8)
            yield [bytes(data)]


def test_ten_thousand_fuzzed_frames_do_not_hurt_the_daemon(cluster3):
    d, sds, nodes = cluster3
    root_key, _ = sds[0].load_identity()
    member_key, _ = sds[1].load_identity()  # an authenticated member sending garbage
    stranger = NodeKey.generate()  # and an unknown key on the join port
    mesh, join = _endpoints(nodes, 0)
    before = control(sds[0], "status")["stats"]
    ctx = zmq.Context()
    socks = []
    for key, endpoint in ((member_key, mesh), (stranger, join)):
        s = ctx.socket(zmq.DEALER)
        s.curve_serverkey = root_key.curve_public
        s.curve_publickey, s.curve_secretkey = key.curve_public, key.curve_secret
        s.linger = 0
        s.connect(endpoint)
        socks.append(s)
    rng = random.Random(20261123)
    gen = _mutations(rng)
    sent = 0
    try:
        time.sleep(0.3)  # CURVE handshakes
        while sent < 10_000:
            s = socks[sent % 2]
            s.send_multipart(next(gen))
            sent += 1
            for sock in socks:  # drain replies so nothing backs up
                while sock.poll(0):
                    sock.recv_multipart()
        time.sleep(0.5)
        for sock in socks:
            while sock.poll(50):
                sock.recv_multipart()
    finally:
        for s in socks:
            s.close(0)
        ctx.term()
    # The daemon works through its queue after the last send; on a slow host that takes seconds.
    received = lambda: control(sds[0], "status")["stats"]["received"] - before["received"]  # noqa: E731
    assert wait_for(lambda: received() >= 9_000, 30, 0.5), "the fuzz frames reached the daemon"
    after = control(sds[0], "status")
    st = after["stats"]
    assert st["protocol_errors"] - before["protocol_errors"] >= 5_000
    assert st["internal_errors"] == 0
    assert len(after["members"]) == 3
    assert wait_for(lambda: all(m["state"] == "alive" for m in control(sds[0], "status")["members"]), 30)


def test_user_mistakes_give_one_line_errors(tmp_path):
    def one_line(res, code=None):
        assert res.returncode != 0
        if code is not None:
            assert res.returncode == code, res.stderr
        assert "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        return res.stderr

    assert "missing join token" in one_line(run_cli("join", "--state-dir", str(tmp_path / "a"), home=tmp_path), 3)
    assert "not an edgemesh join token" in one_line(run_cli("join", "garbage", home=tmp_path), 3)
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "state dir" in one_line(run_cli("init", "--state-dir", str(afile), "--no-start", home=tmp_path), 2)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "identity.json").write_text("{")
    assert "corrupt" in one_line(run_cli("status", "--state-dir", str(corrupt), home=tmp_path))
    assert "no edgemesh daemon is running" in one_line(
        run_cli("status", "--state-dir", str(tmp_path / "nothing"), home=tmp_path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        err = one_line(run_cli("init", "--state-dir", str(tmp_path / "b"), "--host", "127.0.0.1",
                               "--port", str(port), "--no-mdns", home=tmp_path), 2)
        assert "already in use" in err
    assert not (tmp_path / "b" / "cluster.json").exists(), "a failed init leaves no half-made cluster"
