"""Bounded pre-authentication state in the collective's TCP links (tcp_links.SecureLinks).

- 10,000 connections opened to a rank that is forming its group and left open (most silent,
  some with half a hello), while that rank has almost no file descriptors left: it evicts,
  survives EMFILE, the real rank still joins, the group works, memory stays bounded.
- A record header forged on the path (inside TLS) is refused by TLS at once, allocating nothing;
  a member whose header announces more than the plan's limit is refused from the header.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from typing import Any

import pytest
import torch

from edgemesh.collective.errors import LinkAuthError, LinkProtocolError, PeerLost
from edgemesh.collective.members import CurveKeys, Peer
from edgemesh.collective.tcp_links import HELLO, MAGIC, MODE_SECURE, PREFIX, SecureLinks, max_message_for
from edgemesh.collective.group import CollectiveGroup, CollectiveOptions
from edgemesh.transport.endpoint import parse_endpoint

from tests.integration.test_collective_tcp_security import Proxy
from tests.integration.test_collective_zmq import LOCAL, in_threads

pytestmark = [pytest.mark.integration, pytest.mark.security]

FLOOD = 10_000
FD_HEADROOM = 12  # descriptors the flooded rank has beyond those open when it starts joining
RSS_BOUND = 32 * 2**20  # its peak RSS may grow by at most this much while flooded and working

# Rank 0 in its own process, so that its descriptor limit can be tiny without touching pytest's.
VICTIM = r"""
import json, os, resource, sys
import torch
from edgemesh.collective.members import CurveKeys, Peer
from edgemesh.collective.tcp_links import SecureLinks
from edgemesh.collective.group import CollectiveGroup, CollectiveOptions

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

args = json.loads(sys.argv[1])
links = SecureLinks.bind("tcp://127.0.0.1:0", CurveKeys(args["public"].encode(), args["secret"].encode()),
                         [k.encode() for k in args["publics"]])
torch.ones(4).sum()
print(links.endpoint, flush=True)
sys.stdin.readline()  # the flood has started
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + args["headroom"], hard))
open("/proc/self/clear_refs", "w").write("5")
rss0 = status("VmRSS")
group = CollectiveGroup(links, 0, 2, [Peer(1, args["peer"], args["publics"][1].encode())],
                      CollectiveOptions(timeout=20.0, connect_timeout=90.0))
out = [float(group.allreduce_sum(torch.full((1000,), float(i + 1)))[0]) for i in range(3)]
print(json.dumps({"sums": out, "evicted": links.evicted_connections, "refused": links.refused_connections,
                  "grew": status("VmHWM") - rss0}), flush=True)
group.close()
"""


def _flood(addr: tuple[str, int], n: int, stop: threading.Event, socks: list[socket.socket]) -> None:
    half_hello = HELLO.pack(MAGIC, MODE_SECURE, 0, 2, 1, 0, os.urandom(32), os.urandom(16))[:40]
    for i in range(n):
        if stop.is_set():
            return
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(addr)
        socks.append(s)
        if i % 10 == 0:
            try:
                s.send(half_hello)
            except OSError:
                pass  # not connected yet: it stays silent
        if i % 500 == 499:
            time.sleep(0.02)  # let the listener breathe; still thousands per second


def test_ten_thousand_idle_connections_and_no_descriptors_left_do_not_stop_the_group(fd_room):
    keys = [CurveKeys.generate() for _ in range(2)]
    publics = [k.public.decode() for k in keys]
    rank1 = SecureLinks.bind(LOCAL, keys[1], [p.encode() for p in publics])
    args = {"public": publics[0], "secret": keys[0].secret.decode(), "publics": publics,
            "peer": rank1.endpoint, "headroom": FD_HEADROOM}
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, json.dumps(args)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    socks: list[socket.socket] = []
    stop = threading.Event()
    attacker: threading.Thread | None = None
    try:
        assert victim.stdin is not None and victim.stdout is not None
        endpoint = victim.stdout.readline().strip()
        assert endpoint.startswith("tcp://"), victim.stderr.read() if victim.stderr else ""
        attacker = threading.Thread(target=_flood, args=(parse_endpoint(endpoint), FLOOD, stop, socks), daemon=True)
        attacker.start()
        time.sleep(0.3)
        victim.stdin.write("go\n")
        victim.stdin.flush()
        attacker.join(120)
        assert len(socks) == FLOOD
        # The real rank 1 dials in behind ten thousand strangers.
        group = CollectiveGroup(rank1, 1, 2, [Peer(0, endpoint, publics[0].encode())],
                              CollectiveOptions(timeout=20.0, connect_timeout=90.0))
        try:
            sums = [float(group.allreduce_sum(torch.full((1000,), float(i + 1)))[0]) for i in range(3)]
        finally:
            group.close()
        assert sums == [2.0, 4.0, 6.0]
        line = victim.stdout.readline()
        assert line, victim.stderr.read() if victim.stderr else ""
        report = json.loads(line)
        assert report["sums"] == [2.0, 4.0, 6.0]
        assert report["evicted"] > 0  # it had to drop strangers to stay within its descriptors
        assert report["grew"] < RSS_BOUND, f"peak RSS grew by {report['grew'] / 2**20:.1f} MiB"
        assert victim.wait(30) == 0
        errors = victim.stderr.read() if victim.stderr else ""
        assert "Traceback" not in errors
        assert "accept() failed (Too many open files)" in errors  # EMFILE was hit, logged and survived
    finally:
        stop.set()
        if attacker is not None:
            attacker.join(30)
        for s in socks:
            s.close()
        if victim.poll() is None:
            victim.kill()
            victim.wait()
        rank1.close()


def _forged_header(announced: int, sent: int):
    """Replace rank 1's first data record (a TLS record) by our own clear record header
    announcing one ``announced``-byte frame, then ``sent`` bytes of it (a path attacker)."""
    def mutate(i: int, record: bytes) -> list[bytes]:
        if i != 0:
            return []
        header = PREFIX.pack(announced, 0, 1, 0) + announced.to_bytes(4, "little")
        return [header + os.urandom(sent)]
    return mutate


def _via_proxy(mutate: Any, max_message: int | None) -> tuple[list[CollectiveGroup], Proxy]:
    keys = [CurveKeys.generate() for _ in range(2)]
    publics = [k.public for k in keys]
    hub_opts = {} if max_message is None else {"max_message": max_message}
    links = [SecureLinks.bind(LOCAL, keys[0], publics, **hub_opts), SecureLinks.bind(LOCAL, keys[1], publics)]
    proxy = Proxy(links[0].endpoint, mutate)
    peers_of = [[Peer(1, links[1].endpoint, publics[1])], [Peer(0, proxy.endpoint, publics[0])]]
    options = CollectiveOptions(timeout=20.0, connect_timeout=5.0)
    groups = in_threads(2, lambda r: CollectiveGroup(links[r], r, 2, peers_of[r], options))
    assert all(isinstance(g, CollectiveGroup) for g in groups), groups
    return groups, proxy


def test_a_forged_huge_header_costs_nothing_and_fails_at_once():
    announced, sent = 200 * 2**20, 2**20  # within the default 256 MiB limit
    groups, proxy = _via_proxy(_forged_header(announced, sent), None)
    try:
        tracemalloc.start()
        try:
            t0 = time.monotonic()
            # Rank 1 may finish this op (direct allreduce: rank 0's part reached it), then
            # learns in its next one that rank 0 gave up.
            res = in_threads(2, lambda r: [groups[r].allreduce_sum(torch.full((1000,), 1.0)) for _ in range(1 + r)],
                             timeout=30)
            elapsed = time.monotonic() - t0
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert isinstance(res[0], LinkAuthError), res[0]  # not TLS: refused, not read
        assert isinstance(res[1], PeerLost), res[1]
        assert elapsed < 10.0, "refused when it arrived, not at the 20 s deadline"
        assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB allocated for a header announcing 200 MiB"
    finally:
        for g in groups:
            g.close()
        proxy.close()


def test_the_plan_limit_refuses_a_members_huge_header_at_once():
    """A member (past TLS) whose record header announces more than the plan allows: refused
    from the header, before anything is allocated or read for it."""
    limit = max_message_for(576 * 2048 * 4)  # SmolLM2's prefill hidden state at 2048 tokens
    assert 4 * 2**20 < limit < 8 * 2**20
    keys = [CurveKeys.generate() for _ in range(2)]
    publics = [k.public for k in keys]
    links = [SecureLinks.bind(LOCAL, keys[0], publics, max_message=limit), SecureLinks.bind(LOCAL, keys[1], publics)]
    peers = [Peer(r, links[r].endpoint, publics[r]) for r in range(2)]
    groups = in_threads(2, lambda r: CollectiveGroup(links[r], r, 2, peers, CollectiveOptions(timeout=20.0)))
    assert all(isinstance(g, CollectiveGroup) for g in groups), groups
    try:
        announced = 64 * 2**20
        # Rank 1 writes a bare header into its TLS stream, as a compromised member could.
        links[1]._conns[0].sock.send(PREFIX.pack(announced, 0, 1, 0) + announced.to_bytes(4, "little"))
        tracemalloc.start()
        try:
            t0 = time.monotonic()
            res = in_threads(1, lambda r: groups[0].allreduce_sum(torch.full((1000,), 1.0)), timeout=30)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert isinstance(res[0], LinkProtocolError) and "limit" in str(res[0]), res[0]
        assert time.monotonic() - t0 < 10.0, "refused from the header, not at the deadline"
        assert peak < 4 * 2**20, f"{peak / 2**20:.0f} MiB allocated"
    finally:
        for g in groups:
            g.close()
