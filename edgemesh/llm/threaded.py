"""Run a tensor-parallel group as W threads of one process (tests, single-machine benchmarks).

Each rank's ``Participant`` is built in its own thread by ``build(collective)``; rank 0 runs
``master(participant)`` and its result is returned; the other ranks serve until rank 0 sends
stop. An exception in any rank breaks the group's barrier so nobody hangs, and is re-raised.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from edgemesh.collective.base import Collective
from edgemesh.collective.inproc import make_thread_group
from edgemesh.llm.follow import follow_master
from edgemesh.llm.model import Participant

T = TypeVar("T")


def run_thread_group(
    world_size: int,
    build: Callable[[Collective], Participant],
    master: Callable[[Participant], T],
    timeout: float = 300.0,
) -> T:
    group = make_thread_group(world_size, timeout=timeout)
    errors: list[BaseException] = []
    result: list[T] = []

    def worker(rank: int) -> None:
        try:
            p = build(group[rank])
            if rank == 0:
                try:
                    result.append(master(p))
                except BaseException:
                    group[0].close()  # wake the workers with an error instead of a stop
                    raise
                p.stop_workers()
            else:
                follow_master(p)
        except BaseException as exc:  # noqa: BLE001 - collected and re-raised in the caller
            errors.append(exc)
            group[rank].close()

    threads = [threading.Thread(target=worker, args=(r,), name=f"edgemesh-rank{r}") for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        # The first error is the cause; the others are usually broken-barrier echoes.
        cause = next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        raise cause
    return result[0]
