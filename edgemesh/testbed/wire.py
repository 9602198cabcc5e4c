"""Userspace delay element: an Ethernet "wire" between two TAP devices, for kernels without netem.

Each end of an emulated link is a persistent TAP device inside a namespace (created by
``ip tuntap add``, so the rest of the set-up is plain ``ip``/``tc`` commands). This process
attaches to both TAPs and copies every frame across, holding it until ``now + delay ± jitter``.
Frames are released in arrival order (a FIFO, never a heap): reordering from jitter would make
TCP look far worse than the jittery links it stands for, and netem's own ``rate``/pfifo
behaviour does the same.

Why one single-threaded loop: two threads would fight over the GIL for every frame;
one loop does ~100k frames/s here, well above a 300 Mbit/s link (25k frames/s).

Run as: ``python -m edgemesh.testbed.wire --a NS:IF --b NS:IF --delay-ms D [--jitter-ms J]``.
It only ever reads and writes its two TAP file descriptors; when it exits (or is killed) the
TAPs lose carrier and the link goes dark, which is what a cut cable does.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import fcntl
import os
import random
import select
import signal
import struct
import sys
import time
from dataclasses import dataclass

from edgemesh.testbed.netns import NETNS_DIR, setns_fd
from edgemesh.testbed.netns import libc as load_libc

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_TUNSETOFFLOAD = 0x400454D0
_TUN_F_CSUM, _TUN_F_TSO4, _TUN_F_TSO6 = 0x01, 0x02, 0x04
_PR_SET_TIMERSLACK = 29
_MAX_FRAME = 65536 + 1024  # a full GSO super-frame plus the virtio-net header
_BATCH = 64  # frames read per fd per wake-up: bounded so releases stay on time under load


@dataclass(frozen=True)
class End:
    """One end of the wire: a TAP device name inside a named network namespace."""

    netns: str
    ifname: str

    @classmethod
    def parse(cls, text: str) -> End:
        netns, sep, ifname = text.partition(":")
        if not sep or not netns or not ifname:
            raise ValueError(f"wire end must be NETNS:IFNAME, got {text!r}")
        return cls(netns, ifname)


def open_tap(end: End, libc: ctypes.CDLL, offload: bool) -> int:
    """Attach to the TAP ``end.ifname`` inside ``end.netns``; returns a non-blocking fd.

    TUNSETIFF looks the name up in the caller's network namespace, so we step into the
    target namespace for the ioctl and straight back out; the fd keeps working from anywhere.

    With ``offload`` the TAP advertises checksum and TSO offload (as a virtio NIC does), so the
    kernel hands over TCP super-frames of up to 64 KiB with a virtio-net header: ~40x fewer
    frames to copy in Python, which is what makes hundreds of Mbit/s possible on a busy
    2-core host. Not used on lossy links: a dropped super-frame would be a burst of ~40
    segments, not the independent losses the scenario asks for.
    """
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"{NETNS_DIR}/{end.netns}", os.O_RDONLY)
    try:
        setns_fd(libc, target)
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
            flags = _IFF_TAP | _IFF_NO_PI | (_IFF_VNET_HDR if offload else 0)
            fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", end.ifname.encode(), flags))
            if offload:
                fcntl.ioctl(fd, _TUNSETOFFLOAD, _TUN_F_CSUM | _TUN_F_TSO4 | _TUN_F_TSO6)
        finally:
            setns_fd(libc, home)
    finally:
        os.close(home)
        os.close(target)
    return fd


class Direction:
    """Frames read from ``src`` and written to ``dst`` after the configured delay."""

    def __init__(self, src: int, dst: int, delay_s: float, jitter_s: float, rng: random.Random) -> None:
        self.src = src
        self.dst = dst
        self.delay_s = delay_s
        self.jitter_s = jitter_s
        self.rng = rng
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.last_release = 0.0

    def release_time(self, now: float) -> float:
        wait = self.delay_s
        if self.jitter_s:
            wait = max(0.0, wait + self.rng.uniform(-self.jitter_s, self.jitter_s))
        # Keep FIFO order: a frame never overtakes the one before it.
        self.last_release = max(self.last_release, now + wait)
        return self.last_release

    def read_some(self) -> None:
        now = time.monotonic()
        for _ in range(_BATCH):
            try:
                frame = os.read(self.src, _MAX_FRAME)
            except BlockingIOError:
                return
            except OSError:
                return  # peer TAP went away (namespace deleted): nothing to carry
            self.queue.append((self.release_time(now), frame))

    def write_due(self, now: float) -> float | None:
        """Write every frame whose time has come; return the next release time, if any."""
        q = self.queue
        while q and q[0][0] <= now:
            _, frame = q.popleft()
            try:
                os.write(self.dst, frame)
            except OSError:
                pass  # like a full NIC ring: the frame is lost
        return q[0][0] if q else None


def run(a: End, b: End, delay_ms: float, jitter_ms: float, seed: int | None, offload: bool) -> None:
    libc = load_libc()
    # Default timer slack (50 us) would add up to 50 us to every sleep; ask for 1 us.
    libc.prctl(_PR_SET_TIMERSLACK, 1000, 0, 0, 0)
    try:
        # netem runs in softirq context, ahead of every user process; the closest a user
        # process gets is a low real-time priority. It blocks in select() between frames and
        # the kernel's RT throttling keeps 5 % of each CPU for others in the worst case.
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (PermissionError, OSError):
        pass  # unprivileged or restricted: still correct, just less punctual under load
    fa = open_tap(a, libc, offload)
    fb = open_tap(b, libc, offload)
    rng = random.Random(seed)
    delay_s, jitter_s = delay_ms / 1000.0, jitter_ms / 1000.0
    dirs = [Direction(fa, fb, delay_s, jitter_s, rng), Direction(fb, fa, delay_s, jitter_s, rng)]
    by_fd = {d.src: d for d in dirs}
    fds = [fa, fb]
    print("ready", flush=True)
    timeout: float | None = None
    while True:
        # select(), not epoll/poll: those round timeouts up to whole milliseconds, which would
        # add up to 1 ms to every delayed frame; select's timeval has microsecond resolution.
        readable, _, _ = select.select(fds, [], [], timeout)
        for fd in readable:
            by_fd[fd].read_some()
        now = time.monotonic()
        nexts = [t for t in (d.write_due(now) for d in dirs) if t is not None]
        timeout = max(0.0, min(nexts) - time.monotonic()) if nexts else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, type=End.parse, help="NETNS:IFNAME of one end")
    parser.add_argument("--b", required=True, type=End.parse, help="NETNS:IFNAME of the other end")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, each direction")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="uniform +/- jitter")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--offload", action="store_true", help="carry TSO super-frames (lossless links)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    run(args.a, args.b, args.delay_ms, args.jitter_ms, args.seed, args.offload)


if __name__ == "__main__":
    main()
