"""BufferPool: a lent block comes back only when nothing derived from it is alive."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from edgemesh.collective.buffers import MIN_POOLED, BufferPool

pytestmark = pytest.mark.unit

N = 1 << 20


def addr(a: memoryview) -> int:
    return int(np.frombuffer(a, np.uint8).ctypes.data)


def test_a_block_is_reused_after_its_last_user_is_gone() -> None:
    pool = BufferPool()
    a = pool.take(N)
    first = addr(a)
    del a
    gc.collect()
    assert pool.idle_bytes == N
    b = pool.take(N)
    assert addr(b) == first and pool.idle_bytes == 0


def test_a_block_stays_lent_while_a_derived_tensor_lives() -> None:
    pool = BufferPool()
    a = pool.take(N)
    np.frombuffer(a, np.uint8)[:] = 7
    # The chains receivers and accumulators build: numpy views of views, then torch.
    t = torch.from_numpy(np.frombuffer(a[64:], dtype=np.float32).reshape(-1, 4)[1:].view(np.int32))
    first = addr(a)
    del a
    gc.collect()
    assert pool.idle_bytes == 0
    b = pool.take(N)  # must not be the block `t` still reads
    assert addr(b) != first
    np.frombuffer(b, np.uint8)[:] = 0
    assert (t.view(torch.uint8) == 7).all()
    del t
    gc.collect()
    assert pool.idle_bytes == N


def test_small_arrays_and_the_cap_are_not_pooled() -> None:
    pool = BufferPool(max_bytes=2 * N)
    small = pool.take(MIN_POOLED - 1)
    blocks = [pool.take(N) for _ in range(3)]
    del small, blocks
    gc.collect()
    assert pool.idle_bytes == 2 * N  # the third one was dropped, the small one never counted
