"""The NAT signalling mailbox is bounded in bytes and in time, also for made-up recipients
(fake clock; no event loop needed for puts)."""

from __future__ import annotations

import asyncio

import pytest

from edgemesh.clock import FakeClock
from edgemesh.nat.mailbox import ENTRY_OVERHEAD, MAX_AGE, MAX_BYTES, MAX_QUEUED, MAX_RECIPIENTS, Mailbox

pytestmark = [pytest.mark.unit, pytest.mark.security]

BIG = 16 * 1024  # the largest signal nat.signal accepts


def _held(box: Mailbox) -> int:
    """Bytes actually queued, counted independently of the mailbox's own tally."""
    return sum(len(s) + ENTRY_OVERHEAD for q in box._queues.values() for _, _, s in q)


def test_made_up_recipients_cannot_pin_more_than_the_byte_budget():
    box = Mailbox(FakeClock())
    for i in range(MAX_RECIPIENTS):  # the old worst case: 1024 recipients x 64 signals x 16 KiB = 1 GiB
        for _ in range(8):
            box.put(f"nobody{i}", bytes(BIG))
    assert _held(box) == box.nbytes <= MAX_BYTES
    assert box.nbytes > MAX_BYTES - BIG - ENTRY_OVERHEAD  # the budget is used, not thrown away
    assert len(box._queues) <= MAX_BYTES // BIG + 1


def test_signals_for_recipients_that_never_poll_expire():
    clock = FakeClock()
    box = Mailbox(clock)
    for i in range(500):
        box.put(f"ghost{i}", b"x" * 1000)
    assert len(box._queues) == 500 and box.nbytes > 0
    clock.advance(MAX_AGE + 0.1)
    box.put("member", b"fresh")  # any later put sweeps what nobody came for
    assert list(box._queues) == ["member"]
    assert box.nbytes == _held(box) == 5 + ENTRY_OVERHEAD


def test_budget_evicts_the_stalest_recipient_first_and_keeps_a_fresh_one():
    clock = FakeClock()
    box = Mailbox(clock, max_bytes=10 * (BIG + ENTRY_OVERHEAD))
    box.put("member", b"offer")
    clock.advance(1.0)
    for i in range(40):
        box.put(f"flood{i % 4}", bytes(BIG))
    assert "member" not in box._queues  # written longest ago: evicted by the flood
    box.put("member", b"offer2")
    assert "member" in box._queues and box.nbytes == _held(box) <= 10 * (BIG + ENTRY_OVERHEAD)
    got, _ = asyncio.run(box.take("member", 0))
    assert got == [b"offer2"]
    assert box.nbytes == _held(box)


def test_per_recipient_cap_and_accounting_through_polls():
    clock = FakeClock()
    box = Mailbox(clock)
    for i in range(MAX_QUEUED + 10):
        box.put("n", bytes([i]))
    assert box.nbytes == _held(box) == MAX_QUEUED * (1 + ENTRY_OVERHEAD)

    async def drain() -> None:
        got, ack = await box.take("n", 0)
        assert got[0] == bytes([10]) and len(got) == MAX_QUEUED
        assert await box.take("n", 0, ack) == ([], ack)

    asyncio.run(drain())
    assert box.nbytes == 0 and not box._queues
    box.put("old", b"a")
    clock.advance(MAX_AGE / 2)
    box.put("young", b"b")
    clock.advance(MAX_AGE / 2 + 0.1)
    assert asyncio.run(box.take("old", 0))[0] == []  # expired although a younger queue exists
    assert asyncio.run(box.take("young", 0))[0] == [b"b"]
    box.forget("young")
    assert box.nbytes == 0
