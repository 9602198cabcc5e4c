"""NAT traversal, sans-IO parts: framing, signed signalling, hello, TURN credentials, servers,
mailbox, RPC-over-channel dedup."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
from dataclasses import replace

import pytest

from edgemesh.errors import AuthError, ConfigError, ProtocolError
from edgemesh.identity.keys import NodeKey
from edgemesh.rpc.dispatch import RpcStats
from edgemesh.nat.binding import Signal, check_hello, check_signal, decode_signal, make_hello, now_ms
from edgemesh.nat.channel_rpc import ChannelRpc
from edgemesh.nat.framing import LAST, MORE, Reassembler, chunks, decode_frames, encode_frames
from edgemesh.nat.ice import path_of
from edgemesh.nat.mailbox import Mailbox
from edgemesh.nat.servers import parse_server, servers_from
from edgemesh.nat.turn import coturn_config, rest_credential, turn_secret

pytestmark = pytest.mark.unit
CLUSTER = "c0ffee"


def test_frames_roundtrip_and_golden_bytes():
    msg = encode_frames([b"ab", b""])
    assert msg.hex() == "00000002" "00000002" "6162" "00000000"
    assert [bytes(f) for f in decode_frames(msg)] == [b"ab", b""]


@pytest.mark.parametrize("bad", [b"", b"\x00\x00\x00\x00", b"\x00\x00\x00\x01\x00\x00\x00\x05ab",
                                 b"\x00\x00\x00\x01\x00\x00\x00\x01abc", b"\xff\xff\xff\xff"])
def test_malformed_frames_raise_protocol_error(bad):
    with pytest.raises(ProtocolError):
        decode_frames(bad)


def test_chunks_reassemble_in_order_and_bad_flags_are_refused():
    data = bytes(range(256)) * 1000
    parts = chunks(data, 1000)
    assert all(p[0] == MORE for p in parts[:-1]) and parts[-1][0] == LAST
    r = Reassembler()
    got = [r.feed(p) for p in parts]
    assert got[:-1] == [None] * (len(parts) - 1) and got[-1] == data
    assert Reassembler().feed(chunks(b"")[0]) == b""
    with pytest.raises(ProtocolError):
        Reassembler().feed(b"\x07x")
    with pytest.raises(ProtocolError):
        small = Reassembler(max_bytes=10)
        small.feed(b"\x00" + b"x" * 8)
        small.feed(b"\x01" + b"x" * 8)


def _signal(key: NodeKey, to: str, kind: str = "offer", **kw) -> Signal:
    base = Signal(kind, b"s" * 16, key.node_id, to, "ufrag", "pwd", ("candidate:1 1 udp 1 10.0.0.1 5 typ host",),
                  (("sha-256", "AA:BB"),), b"n" * 16, True, now_ms())
    return replace(base, **kw).signed(CLUSTER, key)


def test_signal_roundtrip_and_identity_checks():
    a, b, mallory = NodeKey.generate(), NodeKey.generate(), NodeKey.generate()
    keys = {a.node_id: a.sign_public, b.node_id: b.sign_public}
    s = decode_signal(_signal(a, b.node_id).encode())
    check_signal(CLUSTER, s, b.node_id, keys.get)
    with pytest.raises(AuthError):  # for someone else
        check_signal(CLUSTER, s, a.node_id, keys.get)
    with pytest.raises(AuthError):  # altered by a relay
        check_signal(CLUSTER, replace(s, candidates=("candidate:9 1 udp 1 192.0.2.66 5 typ host",)), b.node_id, keys.get)
    forged = replace(_signal(mallory, b.node_id), sender=a.node_id).signed(CLUSTER, mallory)
    with pytest.raises(AuthError):  # claims a member's id, signed with another key
        check_signal(CLUSTER, forged, b.node_id, keys.get)
    with pytest.raises(AuthError):  # stale: a replay
        check_signal(CLUSTER, _signal(a, b.node_id, ts=now_ms() - 3_600_000), b.node_id, keys.get)
    with pytest.raises(AuthError):  # other cluster
        check_signal("other", s, b.node_id, keys.get)


@pytest.mark.parametrize("bad", [b"", b"\xc1", b"\x90", b"x" * 20000, 5, "str"])
def test_malformed_signals_raise_protocol_error(bad):
    with pytest.raises(ProtocolError):
        decode_signal(bad)


def test_hello_binds_both_keys_and_the_session():
    a, b, mallory = NodeKey.generate(), NodeKey.generate(), NodeKey.generate()
    offer, answer = _signal(a, b.node_id), _signal(b, a.node_id, kind="answer", nonce=b"m" * 16)
    hello = make_hello(CLUSTER, a, offer, answer, a.node_id, b.node_id)
    check_hello(CLUSTER, hello, a.sign_public, offer, answer, b.node_id, a.node_id)
    wrong_key = make_hello(CLUSTER, mallory, offer, answer, a.node_id, b.node_id)
    with pytest.raises(AuthError):
        check_hello(CLUSTER, wrong_key, a.sign_public, offer, answer, b.node_id, a.node_id)
    other_session = replace(answer, fingerprints=(("sha-256", "EE:FF"),))
    with pytest.raises(AuthError):
        check_hello(CLUSTER, hello, a.sign_public, offer, other_session, b.node_id, a.node_id)
    with pytest.raises(ProtocolError):
        check_hello(CLUSTER, b"\xc1", a.sign_public, offer, answer, b.node_id, a.node_id)


def test_turn_rest_credentials_match_coturn_scheme():
    secret = turn_secret(b"k" * 32)
    assert secret != (b"k" * 32).hex() and len(secret) == 64
    cred = rest_credential(secret, "node1", now=1000, ttl=60)
    assert cred.username == "1060:node1"
    assert cred.password == base64.b64encode(hmac.new(secret.encode(), b"1060:node1", hashlib.sha1).digest()).decode()
    conf = coturn_config("198.18.0.2", secret, "/tmp/x.log")  # type: ignore[arg-type]
    assert "use-auth-secret" in conf and f"static-auth-secret={secret}" in conf
    assert "denied-peer-ip=10.0.0.0-10.255.255.255" in conf and "denied-peer-ip=192.168.0.0-192.168.255.255" in conf


def test_server_urls_parse_and_local_settings_win():
    assert parse_server("turn:u:p@192.0.2.4:5").username == "u"
    assert parse_server("stun:h").port == 3478
    for bad in ("http://x", "stun:u:p@h", "turn:h:99999", ""):
        with pytest.raises(ConfigError):
            parse_server(bad)
    stun, turn = servers_from(["turn:a:1"], ["stun:b:2", "turn:c:3", "garbage"])
    assert (stun.host, turn.host) == ("b", "a")
    stun, turn = servers_from([], ["turn:c:3"])
    assert (stun.scheme, stun.host, stun.port) == ("stun", "c", 3)


def test_path_names():
    assert path_of("relay", "host", "198.51.100.1", "198.51.100.2") == "relayed"
    assert path_of("host", "host", "10.0.0.2", "10.0.0.3") == "lan"
    assert path_of("host", "prflx", "10.0.0.2", "203.0.113.5") == "punched"
    assert path_of("host", "host", "10.0.0.2", "198.18.0.2") == "punched"


def test_mailbox_long_poll_and_bounds():
    async def main():
        box = Mailbox()
        assert box.put("n", b"early") is False  # nobody polled yet, but it waits
        got, ack = await box.take("n", 0.0)
        assert got == [b"early"]
        waiter = asyncio.ensure_future(box.take("n", 5.0, ack))
        await asyncio.sleep(0.01)
        assert box.put("n", b"x") is True
        got, ack = await asyncio.wait_for(waiter, 10.0)  # woken by the put at once; 10 s: a loaded host
        assert got == [b"x"]  # "early" was acknowledged by this poll: gone
        assert await box.take("n", 0, ack) == ([], ack)
        for i in range(200):
            box.put("m", bytes([i % 256]))
        assert len((await box.take("m", 0))[0]) == 64
        assert await box.take("empty", 0.01) == ([], 0)

    asyncio.run(main())


def test_mailbox_bounds_the_number_of_recipients():
    from edgemesh.nat.mailbox import MAX_RECIPIENTS

    async def main():
        box = Mailbox()
        box.put("member", b"for a member")
        for i in range(MAX_RECIPIENTS + 10):  # a member naming made-up recipients
            box.put(f"nobody{i}", b"x")
            if i == 100:
                box.put("member", b"again")  # written again: among the newest 1024 recipients, kept
        assert len(box._queues) == MAX_RECIPIENTS and not box._events
        assert (await box.take("nobody0", 0))[0] == []  # the recipient written longest ago went first
        assert (await box.take("member", 0))[0] == [b"for a member", b"again"]

    asyncio.run(main())


def test_mailbox_keeps_signals_a_dead_poller_took_for_its_successor():
    """A long poll of a daemon that has stopped wakes with the signal meant for the restarted
    daemon; the signal stays until a poll acknowledges it, so the new daemon still gets it."""
    async def main():
        box = Mailbox()
        stale = asyncio.ensure_future(box.take("n", 5.0))
        await asyncio.sleep(0.01)
        box.put("n", b"offer")
        assert (await asyncio.wait_for(stale, 10.0))[0] == [b"offer"]  # the answer goes nowhere
        got, ack = await box.take("n", 0.0)  # the new incarnation starts from ack 0
        assert got == [b"offer"]
        box.put("n", b"second")
        assert (await box.take("n", 0.0, ack))[0] == [b"second"]

    asyncio.run(main())


class _Pipe:
    """A fake channel: messages go to the other ChannelRpc unless the pipe is cut."""

    def __init__(self) -> None:
        self.peer: ChannelRpc | None = None
        self.cut = False
        self.sent = 0

    async def send(self, message: bytes) -> None:
        if self.cut:
            raise ConnectionError("cut")
        self.sent += 1
        assert self.peer is not None
        self.peer.on_message(message)


def test_rpc_over_channels_survives_a_path_swap_and_runs_handlers_once():
    async def main():
        runs = []

        async def work(call):
            runs.append(call.body)
            await asyncio.sleep(0.05)
            return {"done": call.body["n"], "bytes": sum(len(v) for _, v in call.tensors)}

        stats = RpcStats()
        client = ChannelRpc(b"a", {}, lambda k, m: True, stats)
        server = ChannelRpc(b"b", {"work": work}, lambda k, m: k == b"KEYA", stats)
        # Path 1 delivers the request, then breaks before the reply comes back.
        p1_to_srv, p1_to_cli = _Pipe(), _Pipe()
        p1_to_srv.peer, p1_to_cli.peer = server, client
        client.attach(p1_to_srv, b"KEYB")
        server.attach(p1_to_cli, b"KEYA")
        # The call's own timeout must not fire while the test cuts and swaps paths: far beyond
        # the 0.1 s it takes (it was 2 s; a stalled host could reach it).
        call = asyncio.ensure_future(client.call("work", {"n": 1}, timeout=30.0))
        await asyncio.sleep(0.01)
        p1_to_cli.cut = True
        await asyncio.sleep(0.1)
        assert not call.done()
        # Path 2: the request is re-sent with the same rid; the cached reply answers it.
        p2_to_srv, p2_to_cli = _Pipe(), _Pipe()
        p2_to_srv.peer, p2_to_cli.peer = server, client
        server.attach(p2_to_cli, b"KEYA")
        client.attach(p2_to_srv, b"KEYB")
        body, _ = await call
        assert body["done"] == 1 and runs == [{"n": 1}] and client.resent == 1
        server.on_message(b"garbage")  # counted, not raised
        assert stats.protocol_errors == 1
        from edgemesh.errors import RpcError, RpcTimeout

        stranger = ChannelRpc(b"c", {"work": work}, lambda k, m: k == b"KEYA", RpcStats())
        back, fwd = _Pipe(), _Pipe()
        back.peer, fwd.peer = client, stranger
        stranger.attach(back, b"KEYX")  # the server side sees an unauthorized key
        client.attach(fwd, b"KEYC")
        with pytest.raises(RpcError) as refused:
            await client.call("work", {"n": 2}, timeout=10.0)
        assert not isinstance(refused.value, RpcTimeout)  # refused at once, not timed out

    asyncio.run(main())


class _FakeChannel:
    def __init__(self, path: str) -> None:
        self.path = path
        self.closed = asyncio.Event()
        self.heard = 0.0

    async def recv(self):
        await self.closed.wait()
        return None

    def dead(self) -> bool:
        return False

    async def send(self, message: bytes) -> None:
        pass

    async def close(self) -> None:
        self.closed.set()


class _FakeLink:
    def __init__(self) -> None:
        self.rpc = ChannelRpc(b"\x00" * 10, {}, lambda key, method: False, RpcStats())
        self.paths: list[str | None] = []

    def set_ice(self, path):
        self.paths.append(path)


def test_a_punched_channel_replaces_a_relayed_one_never_the_reverse():
    from edgemesh.nat.traversal import Traversal

    async def main():
        me, peer = NodeKey.generate(), NodeKey.generate()
        link = _FakeLink()
        peers = type("Peers", (), {"get": lambda self, node: link if node == peer.node_id else None,
                                   "clients": lambda self: []})()
        t = Traversal(me, CLUSTER, peers, lambda node: peer.sign_public if node == peer.node_id else None,
                      lambda key: None, lambda: (None, None), None, lambda node: asyncio.sleep(0))
        relayed, punched, late_relay = _FakeChannel("relayed"), _FakeChannel("punched"), _FakeChannel("relayed")
        assert t._attach(peer.node_id, relayed)
        assert t._attach(peer.node_id, punched)  # upgrade: the relay is closed
        await asyncio.sleep(0.05)
        assert relayed.closed.is_set() and link.rpc.channel is punched
        assert not t._attach(peer.node_id, late_relay)  # a relayed session finishing late loses
        assert link.rpc.channel is punched and t.channel_paths() == {peer.node_id: "punched"}
        await punched.close()  # the punched path breaks: a relayed channel may take over
        await asyncio.sleep(0.05)
        assert t._attach(peer.node_id, _FakeChannel("relayed"))
        await t.close()

    asyncio.run(main())


def test_signals_go_to_every_member_that_may_relay_them_without_waiting_for_the_slow():
    """Unprobed members (``direct is None``, as just after a restart) relay signals too; members
    known unreachable do not; the sender goes on once one relay has the signal, and a relay
    that never answers holds up nothing."""
    from edgemesh.nat.traversal import Traversal

    async def main():
        me = NodeKey.generate()
        calls = []

        class Client:
            def __init__(self, name, hang=False):
                self.name, self.hang = name, hang

            async def call(self, method, body, timeout):
                calls.append((self.name, method, body["to"]))
                await asyncio.sleep(3600 if self.hang else 0.1)
                return {"active": True}, []

        links = [type("L", (), {"node_id": n, "direct": d, "client": Client(n, hang=n == "slow")})()
                 for n, d in (("probed", True), ("unprobed", None), ("natted", False), ("slow", True))]
        peers = type("Peers", (), {"get": lambda self, node: None, "clients": lambda self: links})()
        t = Traversal(me, CLUSTER, peers, lambda node: None, lambda key: None, lambda: (None, None), None,
                      lambda node: asyncio.sleep(0))
        loop = asyncio.get_running_loop()
        start = loop.time()
        # The hanging relay sleeps an hour: any cap far below that shows it holds nothing up
        # (it was 0.5 s, tight for a loaded host; typical 0.1 s).
        await asyncio.wait_for(t._deliver("target", b"signal"), 10.0)
        assert loop.time() - start >= 0.09  # returns once a relay has the signal, not before
        assert sorted(name for name, _, _ in calls) == ["probed", "slow", "unprobed"]
        assert all(m == "nat.signal" and to == "target" for _, m, to in calls)
        assert (await t.mailbox.take("target", 0))[0] == [b"signal"]  # and kept here, should it poll us
        await t.close()

    asyncio.run(main())
