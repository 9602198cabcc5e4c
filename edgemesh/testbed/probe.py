"""Link measurement agent, run inside testbed namespaces by ``testbed check``.

``serve`` answers on one port, UDP and TCP: UDP echo (RTT), a UDP sink that counts packets
per session and reports the count on request (one-way loss), and a TCP sink that reports
the rate at which it received (throughput). ``client`` measures against a server and prints
one JSON line. Standard library only, so it starts fast inside a namespace.

Why our own and not ping/iperf3: neither is guaranteed to be installed, ping measures loss
both ways at once, and this way the numbers are computed exactly as ``check`` compares them.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

_ECHO, _LOSS, _QUERY, _COUNT = b"E", b"L", b"Q", b"C"
_FLOOD, _RATE_QUERY, _RATE = b"F", b"R", b"A"
_FLOOD_PAYLOAD = 1400
_UDP_FRAME_OVERHEAD = 14 + 20 + 8  # Ethernet + IP + UDP per datagram
_TCP_CHUNK = 1 << 16
TCP_WARMUP_S = 0.5  # slow start and the shaper's initial burst are not the link's rate


@dataclass
class Result:
    rtt_ms: float | None = None
    rtt_samples: int = 0
    loss_sent: int = 0
    loss_received: int | None = None
    loss_pct: float | None = None
    mbit: float | None = None  # link (Ethernet frame) rate
    goodput_mbit: float | None = None  # TCP payload rate
    method: str = "tcp"


class _Flood:
    """Arrival rate of one UDP flood, after the warm-up (the shaper's burst and queue filling)."""

    def __init__(self, now: float) -> None:
        self.first = now
        self.last = now
        self.bytes = 0

    def add(self, now: float, size: int) -> None:
        if now - self.first >= TCP_WARMUP_S:
            self.bytes += size + _UDP_FRAME_OVERHEAD
            self.last = now

    def mbit(self) -> float:
        span = self.last - self.first - TCP_WARMUP_S
        return self.bytes * 8 / span / 1e6 if span > 0.05 else 0.0


def _udp_server(sock: socket.socket) -> None:
    counts: dict[bytes, int] = {}
    floods: dict[bytes, _Flood] = {}
    while True:
        data, peer = sock.recvfrom(2048)
        kind = data[:1]
        if kind == _FLOOD:
            now = time.monotonic()
            flood = floods.get(data[1:9])
            if flood is None:
                flood = floods[data[1:9]] = _Flood(now)
            flood.add(now, len(data))
        elif kind == _RATE_QUERY:
            flood = floods.get(data[1:9])
            sock.sendto(_RATE + data[1:9] + struct.pack("!d", flood.mbit() if flood else 0.0), peer)
        elif kind == _ECHO:
            sock.sendto(data, peer)
        elif kind == _LOSS:
            sid = data[1:9]
            counts[sid] = counts.get(sid, 0) + 1
        elif kind == _QUERY:
            sid = data[1:9]
            sock.sendto(_COUNT + sid + struct.pack("!I", counts.get(sid, 0)), peer)


def _frame_factor(conn: socket.socket) -> float:
    """Ethernet bytes per payload byte for full-size segments: shapers count frames, not payload."""
    try:
        mss = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
    except OSError:
        mss = 1448
    if mss <= 0:
        mss = 1448
    # 14 Ethernet + 20 IP + 20 TCP + 12 timestamp option (Linux default) per segment.
    return (mss + 14 + 20 + 20 + 12) / mss


def _tcp_conn(conn: socket.socket) -> None:
    factor = _frame_factor(conn)
    with conn:
        first = last = None
        measured = 0
        while True:
            data = conn.recv(1 << 20)
            if not data:
                break
            now = time.monotonic()
            if first is None:
                first = now
            if now - first >= TCP_WARMUP_S:
                measured += len(data)
                last = now
        span = (last - first - TCP_WARMUP_S) if (first is not None and last is not None) else 0.0
        goodput = measured * 8 / span / 1e6 if span > 0.05 else None
        mbit = goodput * factor if goodput is not None else None
        conn.sendall(json.dumps({"mbit": mbit, "goodput_mbit": goodput}).encode())


def serve(bind: str, port: int) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((bind, port))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((bind, port))
    tcp.listen(8)
    threading.Thread(target=_udp_server, args=(udp,), daemon=True).start()
    print("ready", flush=True)
    while True:
        conn, _ = tcp.accept()
        threading.Thread(target=_tcp_conn, args=(conn,), daemon=True).start()


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


_TIMESPEC = struct.Struct("@qq")
# Linux's SO_TIMESTAMPNS (= SCM_TIMESTAMPNS; asm-generic value, 64-bit time_t); Python does not export it.
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


def _stamped_socket(family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket whose received packets carry the kernel's arrival time (SO_TIMESTAMPNS, as
    ping uses): the RTT then excludes how long this process took to wake up, which on a busy
    host is often more than the delay being measured."""
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    return sock


def _recv_stamped(sock: socket.socket, sent: float) -> tuple[bytes, float]:
    """One packet and its arrival time on the ``time.time()`` clock (the kernel stamps with
    CLOCK_REALTIME); the time of this call if the kernel gave none, or one that cannot be right
    (before ``sent`` or in the future: the clock was stepped)."""
    data, ancdata, _, _ = sock.recvmsg(2048, socket.CMSG_SPACE(_TIMESPEC.size))
    now = time.time()
    for level, kind, raw in ancdata:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(raw) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(raw)
            stamp = sec + nsec / 1e9
            return data, stamp if sent <= stamp <= now else now
    return data, now


def _echo_rtts(sock: socket.socket, count: int, packet: Callable[[int, float], bytes],
               answers: Callable[[bytes, int], bool], interval_s: float, timeout_s: float) -> list[float]:
    """``count`` echo requests on ``sock`` (``packet(seq, sent)`` builds one), each waiting up to
    ``timeout_s`` for the reply that ``answers(data, seq)``; the RTTs in ms, from the send to the
    kernel's arrival stamp. A request without a reply is lost, not a sample."""
    samples: list[float] = []
    for seq in range(count):
        sent = time.time()  # just before: the send itself is part of the path
        sock.send(packet(seq, sent))
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([sock], [], [], left)[0]:
                break
            data, arrived = _recv_stamped(sock, sent)
            if answers(data, seq):
                samples.append((arrived - sent) * 1000.0)
                break
        time.sleep(interval_s)
    return samples


def measure_icmp_rtt(address: str, count: int, interval_s: float = 0.02, timeout_s: float = 1.0) -> list[float] | None:
    """ICMP echo, answered by the far end's kernel: no user-space scheduling on that side, and
    replies timed by our kernel on arrival. Returns None when raw sockets are not allowed (not root)."""
    try:
        sock = _stamped_socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    except PermissionError:
        return None
    ident = os.getpid() & 0xFFFF
    body = b"\0" * 56

    def packet(seq: int, sent: float) -> bytes:
        header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
        return struct.pack("!BBHHH", 8, 0, _icmp_checksum(header + body), ident, seq) + body

    def answers(reply: bytes, seq: int) -> bool:
        icmp = reply[(reply[0] & 0x0F) * 4 :]  # raw sockets include the IP header
        kind, _, _, got_ident, got_seq = struct.unpack("!BBHHH", icmp[:8])
        return kind == 0 and got_ident == ident and got_seq == seq

    try:
        sock.connect((address, 0))
        return _echo_rtts(sock, count, packet, answers, interval_s, timeout_s)
    finally:
        sock.close()


def measure_rtt(target: tuple[str, int], count: int, interval_s: float = 0.02, timeout_s: float = 1.0) -> list[float]:
    """UDP echo through the probe server (fallback when ICMP raw sockets are not allowed)."""
    sock = _stamped_socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.connect(target)
        return _echo_rtts(sock, count, lambda seq, sent: _ECHO + struct.pack("!Id", seq, sent) + b"\0" * 52,
                          lambda data, seq: struct.unpack("!I", data[1:5])[0] == seq, interval_s, timeout_s)
    finally:
        sock.close()


def measure_loss(target: tuple[str, int], count: int, pps: float, settle_s: float) -> int | None:
    """Send ``count`` datagrams at ``pps``; return how many the far end counted."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(target)
    sid = os.urandom(8)
    start = time.monotonic()
    try:
        for seq in range(count):
            sock.send(_LOSS + sid + struct.pack("!I", seq) + b"\0" * 64)
            # Paced, not a burst: a burst would overflow the shaper and measure the queue.
            wait = start + (seq + 1) / pps - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        time.sleep(settle_s)
        for _ in range(40):  # the query and its answer cross the same lossy link
            sock.send(_QUERY + sid)
            if select.select([sock], [], [], 0.3)[0]:
                data = sock.recv(2048)
                if data[:1] == _COUNT and data[1:9] == sid:
                    return struct.unpack("!I", data[9:13])[0]
        return None
    finally:
        sock.close()


def measure_udp_capacity(target: tuple[str, int], mbit: float, seconds: float) -> float | None:
    """Offer 1.3x ``mbit`` of paced UDP for ``seconds``; the far end reports the rate that
    arrived. Used on lossy links, where TCP measures its congestion control, not the link."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(target)
    sid = os.urandom(8)
    packet = _FLOOD + sid + b"\0" * (_FLOOD_PAYLOAD - 9)
    pps = 1.3 * mbit * 1e6 / ((len(packet) + _UDP_FRAME_OVERHEAD) * 8)
    start = time.monotonic()
    sent = 0
    try:
        while (now := time.monotonic()) - start < seconds:
            due = int((now - start) * pps)
            while sent < due:
                try:
                    sock.send(packet)
                except (BlockingIOError, ConnectionRefusedError):
                    pass
                sent += 1
            time.sleep(0.001)
        time.sleep(0.3)
        for _ in range(40):
            sock.send(_RATE_QUERY + sid)
            if select.select([sock], [], [], 0.3)[0]:
                data = sock.recv(2048)
                if data[:1] == _RATE and data[1:9] == sid:
                    value: float = struct.unpack("!d", data[9:17])[0]
                    return value or None
        return None
    finally:
        sock.close()


def measure_tcp(target: tuple[str, int], seconds: float) -> dict[str, float | None]:
    """Send for ``seconds``; the receiver reports the rate after its warm-up."""
    with socket.create_connection(target, timeout=10) as conn:
        buf = b"\0" * _TCP_CHUNK
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            conn.sendall(buf)
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(30)
        reply = b""
        while True:
            data = conn.recv(4096)
            if not data:
                break
            reply += data
    data: dict[str, float | None] = json.loads(reply or b"{}")
    return data


def trimmed_mean(samples: list[float], cut: float = 0.1) -> float:
    """Mean without the top and bottom 10 %: unbiased under symmetric jitter (a median of a
    FIFO-ordered jittery link is not), robust to the odd ARP or scheduling outlier."""
    ordered = sorted(samples)
    k = int(len(ordered) * cut)
    kept = ordered[k : len(ordered) - k] or ordered
    return statistics.fmean(kept)


def client(args: argparse.Namespace) -> Result:
    target = (args.target, args.port)
    result = Result()
    if args.rtt:
        samples = measure_icmp_rtt(args.target, args.rtt)
        if samples is None:
            samples = measure_rtt(target, args.rtt)
        result.rtt_samples = len(samples)
        result.rtt_ms = trimmed_mean(samples) if samples else None
    if args.loss:
        received = measure_loss(target, args.loss, args.loss_pps, args.settle)
        result.loss_sent = args.loss
        result.loss_received = received
        if received is not None:
            result.loss_pct = 100.0 * (args.loss - received) / args.loss
    if args.udp_mbit:
        result.mbit = measure_udp_capacity(target, args.udp_mbit, args.tcp or 2.0)
        result.method = "udp"
    elif args.tcp:
        tcp = measure_tcp(target, args.tcp)
        result.mbit = tcp.get("mbit")
        result.goodput_mbit = tcp.get("goodput_mbit")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--bind", required=True)
    s.add_argument("--port", type=int, required=True)
    c = sub.add_parser("client")
    c.add_argument("--target", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--rtt", type=int, default=0, help="echo requests")
    c.add_argument("--loss", type=int, default=0, help="datagrams for the loss count")
    c.add_argument("--loss-pps", type=float, default=2000.0)
    c.add_argument("--settle", type=float, default=0.3, help="wait before asking for the count")
    c.add_argument("--tcp", type=float, default=0.0, help="seconds of TCP transfer")
    c.add_argument("--udp-mbit", type=float, default=0.0, help="measure capacity with UDP at 1.3x this rate")
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        serve(args.bind, args.port)
    else:
        print(json.dumps(asdict(client(args))), flush=True)


if __name__ == "__main__":
    main()
