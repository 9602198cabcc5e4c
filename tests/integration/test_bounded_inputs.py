"""Bounded inputs on the daemon's zmq ports: one huge frame from anyone who can reach a port does
not make the daemon hold it (ZMQ_MAXMSGSIZE per socket role), and the daemon keeps serving.

Memory is read as the daemon's peak RSS (VmHWM), reset just before the attack through
/proc/PID/clear_refs, so a frame that was buffered and then freed still shows."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from pathlib import Path

import pytest
import zmq

from edgemesh.identity.keys import NodeKey
from edgemesh.identity.statedir import StateDir
from edgemesh.mesh.rpc import RpcClient
from edgemesh.runtime import local_cluster
from edgemesh.runtime.control import control
from edgemesh.runtime.processes import running_daemon
from edgemesh.transport.zmq_link import MAX_FRAME, ZmqTransport

from .conftest import wait_for
from tests.integration.conftest import cluster_base_port

pytestmark = [pytest.mark.integration, pytest.mark.security]

FRAME = 100_000_000  # the attack: one 100 MB frame
RSS_BOUND = 16 * 2**20  # the daemon's peak RSS may grow by at most this much (it grew by 121 MiB without the caps)


@pytest.fixture
def node(tmp_path):
    d = tmp_path / "lc"
    nodes = local_cluster.up(d, 1, base_port=cluster_base_port())
    state = StateDir(Path(nodes[0].state_dir))
    yield state, nodes[0].port
    local_cluster.down(d)


def _status(path: Path, key: str) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


class PeakRss:
    def __init__(self, pid: int) -> None:
        self.proc = Path(f"/proc/{pid}")
        # A fresh daemon still imports (aiortc, ~20 MB) and measures itself: wait until its RSS
        # holds still for a second, so the growth measured is the attack's.
        last, deadline = -1, time.monotonic() + 15
        while time.monotonic() < deadline:
            now = _status(self.proc / "status", "VmRSS")
            if abs(now - last) < 512 * 1024:
                break
            last = now
            time.sleep(1.0)
        (self.proc / "clear_refs").write_text("5")  # peak RSS := current RSS
        self.start = _status(self.proc / "status", "VmRSS")

    def growth(self) -> int:
        return _status(self.proc / "status", "VmHWM") - self.start


def _send_huge(endpoint: str, server_key: bytes, wait: float = 10.0) -> bool:
    """Send one FRAME-byte frame as a stranger with a fresh key; True if the server cut us off."""
    stranger = NodeKey.generate()
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.curve_serverkey = server_key
    s.curve_publickey, s.curve_secretkey = stranger.curve_public, stranger.curve_secret
    s.linger = 0
    s.setsockopt(zmq.RECONNECT_IVL, 10_000)  # no second attempt within the test
    mon = s.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        s.connect(endpoint)
        s.send(bytes(FRAME), copy=False)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if mon.poll(200):
                msg = mon.recv_multipart()
                if struct.unpack("=hi", msg[0][:6])[0] == zmq.EVENT_DISCONNECTED:
                    return True
        return False
    finally:
        mon.close(0)
        s.close(0)
        ctx.term()


async def _join_challenge(endpoint: str, server_key: bytes) -> dict:
    key = NodeKey.generate()
    transport = ZmqTransport(key)
    try:
        client = RpcClient(transport.client(endpoint, server_key), bytes.fromhex(key.node_id))
        reader = asyncio.ensure_future(client.run())
        try:
            body, _ = await client.call("join.challenge", {"cnonce": b"c" * 32, "exp": int(time.time()) + 60}, timeout=5)
            return body
        finally:
            reader.cancel()
    finally:
        transport.close()


def test_a_100_mb_frame_to_the_join_port_is_cut_off_not_buffered(node):
    state, port = node
    key, _ = state.load_identity()
    pid = int(running_daemon(state)["pid"])
    assert control(state, "status")["node"] == key.node_id
    peak = PeakRss(pid)
    cut = _send_huge(f"tcp://127.0.0.1:{port + 1}", key.curve_public)
    time.sleep(0.5)
    grew = peak.growth()
    assert grew < RSS_BOUND, f"daemon peak RSS grew by {grew / 2**20:.0f} MiB for one {FRAME / 1e6:.0f} MB frame"
    assert cut, "the join port dropped the connection"
    st = control(state, "status")  # still serving: control, and the join port for the next joiner
    assert st["node"] == key.node_id and st["stats"]["internal_errors"] == 0
    assert "nonce" in asyncio.run(_join_challenge(f"tcp://127.0.0.1:{port + 1}", key.curve_public))


def test_a_huge_handshake_frame_to_the_mesh_port_is_cut_off(node):
    """Before CURVE authenticates anyone, the handshake's own frames pass through the same
    decoder: a stranger announcing a 100 MB command is dropped at the announcement."""
    state, port = node
    key, _ = state.load_identity()
    peak = PeakRss(int(running_daemon(state)["pid"]))
    greeting = b"\xff" + bytes(8) + b"\x7f" + bytes([3, 0]) + b"CURVE".ljust(20, b"\0") + b"\0" + bytes(31)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(greeting)
        s.settimeout(10)
        got = b""
        while len(got) < 64:
            chunk = s.recv(64 - len(got))
            if not chunk:
                break
            got += chunk
        assert got[:1] == b"\xff", "the mesh port speaks ZMTP"
        sent, cut = 0, False
        try:
            s.sendall(b"\x06" + struct.pack(">Q", FRAME))  # long command frame, 100 MB announced
            block = bytes(1 << 20)
            while sent < FRAME:
                s.sendall(block)
                sent += len(block)
        except OSError:
            cut = True
    time.sleep(0.5)
    grew = peak.growth()
    assert grew < RSS_BOUND, f"daemon peak RSS grew by {grew / 2**20:.0f} MiB"
    assert cut and sent < FRAME, "the daemon closed the connection instead of reading 100 MB"
    assert control(state, "status")["node"] == key.node_id


def test_frame_limits_fit_what_each_port_carries():
    from edgemesh.runtime.job_server import CHUNK_MAX
    from edgemesh.runtime.worker_main import CHUNK
    from edgemesh.transport.zmq_link import CLIENT_MAX_FRAME
    from edgemesh.wire.envelope import MAX_ENVELOPE_BYTES

    assert CHUNK <= CHUNK_MAX <= CLIENT_MAX_FRAME  # a weight chunk is one reply frame
    assert MAX_ENVELOPE_BYTES <= MAX_FRAME["mesh"] and MAX_ENVELOPE_BYTES <= CLIENT_MAX_FRAME
    assert MAX_FRAME["join"] <= 64 * 1024 and MAX_FRAME["data"] <= 64 * 1024


def _fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def test_ten_thousand_half_open_connections(node, fd_room):
    """Connections that never start their handshake (5,000 each to the join and mesh ports) are
    held within a memory bound, the daemon keeps answering, and it closes them after the
    handshake interval although the attacker keeps them open."""
    state, port = node
    key, _ = state.load_identity()
    pid = int(running_daemon(state)["pid"])
    base_fds = _fds(pid)
    peak = PeakRss(pid)
    socks: list[socket.socket] = []
    try:
        for i in range(10_000):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port + i % 2))
            socks.append(s)
            if i % 1000 == 999:
                time.sleep(0.05)
        held = max(_fds(pid) - base_fds, 0)
        assert control(state, "status", timeout=10)["node"] == key.node_id
        # Reaped by the handshake interval (10 s), not held until the attacker lets go.
        assert wait_for(lambda: _fds(pid) < base_fds + 100, 25, 0.5), f"{_fds(pid) - base_fds} still held"
        grew = peak.growth()
        assert grew < 64 * 2**20, f"peak RSS grew by {grew / 2**20:.0f} MiB holding {held} connections"
        assert control(state, "status", timeout=10)["stats"]["internal_errors"] == 0
    finally:
        for s in socks:
            s.close()


def test_the_join_port_keeps_a_bounded_number_of_strangers(node):
    """Strangers that finish the CURVE handshake on the join port (any key may) and stay: about
    MAX_PEERS["join"] are kept (the count can lag a connection or two), the rest are refused at
    the handshake; once they go, a joiner gets in again."""
    from edgemesh.transport.zmq_link import MAX_PEERS

    state, port = node
    key, _ = state.load_identity()
    pid = int(running_daemon(state)["pid"])
    cap = MAX_PEERS["join"]
    base_fds = _fds(pid)
    before = control(state, "status")["stats"]["refused_connections"]
    ctx = zmq.Context()
    socks = []
    try:
        for _ in range(cap + 36):
            stranger = NodeKey.generate()
            s = ctx.socket(zmq.DEALER)
            s.curve_serverkey = key.curve_public
            s.curve_publickey, s.curve_secretkey = stranger.curve_public, stranger.curve_secret
            s.linger = 0
            s.setsockopt(zmq.RECONNECT_IVL, 60_000)  # a refused one does not come back during the test
            s.connect(f"tcp://127.0.0.1:{port + 1}")
            socks.append(s)
        refused = lambda: control(state, "status")["stats"]["refused_connections"] - before  # noqa: E731
        assert wait_for(lambda: refused() >= 30, 20, 0.5), f"only {refused()} refused"
        time.sleep(1.0)
        assert _fds(pid) - base_fds <= cap + 4, f"{_fds(pid) - base_fds} connections held"
        assert control(state, "status")["node"] == key.node_id  # the mesh/control port is unaffected
    finally:
        for s in socks:
            s.close(0)
        ctx.term()
    assert wait_for(lambda: _fds(pid) <= base_fds + 4, 10, 0.2)
    assert "nonce" in asyncio.run(_join_challenge(f"tcp://127.0.0.1:{port + 1}", key.curve_public))


def test_signals_for_made_up_recipients_stay_within_the_mailbox_budget(node):
    """A member drops 5,000 signals of 16 KiB (80 MB) for 200 recipients that do not exist (25
    each, within the per-recipient and recipient caps): the daemon keeps at most the mailbox's
    byte budget and keeps answering."""
    from edgemesh.mesh.rpc import rpc_session
    from edgemesh.nat.mailbox import MAX_BYTES

    state, port = node
    key, _ = state.load_identity()  # the node's own key is a member key
    peak = PeakRss(int(running_daemon(state)["pid"]))

    async def flood() -> int:
        transport = ZmqTransport(key)
        try:
            async with rpc_session(transport, f"tcp://127.0.0.1:{port}", key.curve_public,
                                   bytes.fromhex(key.node_id)) as client:
                signal = bytes(16 * 1024)
                sent = 0
                for batch in range(50):
                    await asyncio.gather(*(client.call("nat.signal", {"to": f"nobody-{i + 100 * batch % 200}", "signal": signal},
                                                       timeout=30) for i in range(100)))
                    sent += 100
                return sent
        finally:
            transport.close()

    assert asyncio.run(flood()) == 5_000
    grew = peak.growth()
    # The 4 MiB budget plus what 100 requests in flight cost. Measured: +7 MiB; +80 MiB without the budget.
    assert MAX_BYTES == 4 * 2**20
    assert grew < 32 * 2**20, f"peak RSS grew by {grew / 2**20:.0f} MiB for 80 MB of signals"
    assert control(state, "status")["node"] == key.node_id
