"""The NAT channel's reply cache (dedup of re-sent requests) is bounded in bytes and in time,
not only in count (issue 18, item 1): a member asking for big replies cannot make a peer hold
4096 of them."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

import pytest

from edgemesh.nat.channel_rpc import ChannelRpc
from edgemesh.rpc.dispatch import SERVED_BYTES, SERVED_SECONDS, Reply, RequestLog, RpcStats
from edgemesh.wire.tensor import TensorSpec

pytestmark = [pytest.mark.unit, pytest.mark.security]

MIB = 1024 * 1024


class _Pipe:
    def __init__(self, peer: ChannelRpc) -> None:
        self.peer = peer

    async def send(self, message: bytes) -> None:
        self.peer.on_message(message)


def test_replies_kept_for_re_sends_stay_within_a_byte_budget_and_expire():
    reply_bytes = 512 * 1024
    calls = 64  # 32 MiB of replies, all of which the count bound (4096) alone would keep

    async def big(call):
        return Reply({"ok": True}, [(TensorSpec("uint8", (reply_bytes,)), bytes(reply_bytes))])

    async def main() -> tuple[int, int]:
        client = ChannelRpc(b"a", {}, lambda k, m: True, RpcStats())
        server = ChannelRpc(b"b", {"big": big}, lambda k, m: True, RpcStats())
        client.attach(_Pipe(server), b"KEYB")
        server.attach(_Pipe(client), b"KEYA")
        clock = [1000.0]
        server._served.now = lambda: clock[0]  # type: ignore[method-assign]
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for _ in range(calls):
                await client.call("big", timeout=10.0)
                await asyncio.sleep(0)
            await asyncio.sleep(0.05)
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - base
            clock[0] += SERVED_SECONDS + 1  # a minute later, one more call: the old answers are gone
            await client.call("big", timeout=10.0)
            await asyncio.sleep(0.05)
            gc.collect()
            later = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        client.close()
        server.close()
        return held, later

    held, later = asyncio.run(main())
    assert held < SERVED_BYTES + 2 * MIB, f"{held / MIB:.1f} MiB held for {calls} replies"
    assert later < 2 * MIB, f"{later / MIB:.1f} MiB still held after the replies expired"


def test_the_request_log_drops_answers_by_age_bytes_and_size():
    now = [0.0]
    log: RequestLog[bytes] = RequestLog(size=100, max_bytes=10, ttl=5.0, now=lambda: now[0])
    for rid in (1, 2, 3):
        assert log.admit(rid) == (True, None)
        log.answered(rid, b"xxxx")
    # 12 bytes > 10: the oldest answer went; the rest replay.
    assert log.bytes == 8 and log.admit(2) == (False, b"xxxx") and log.admit(1) == (True, None)
    log.answered(1, b"y" * 11)  # larger than the whole budget: not kept, its id forgotten
    assert log.admit(1) == (True, None)
    now[0] = 6.0  # past the ttl: answers are forgotten, a running request is still known
    assert log.admit(2) == (True, None) and log.admit(1) == (False, None)
    assert log.bytes == 0
