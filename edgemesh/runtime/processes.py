"""Is a recorded process still the one we started? Pid + start time, never the name.

Every process edgemesh starts is recorded as (pid, create_time); a pid alone may have been
reused by an unrelated process, which we must never signal.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    from edgemesh.identity.statedir import StateDir

SAME_START_TOLERANCE = 1.0  # seconds; create_time is rounded differently across reads


def same_process(pid: int | None, create_time: float | None) -> bool:
    """True while ``pid`` runs and started at ``create_time`` (zombies count as gone)."""
    if pid is None or create_time is None:
        return False
    try:
        proc = psutil.Process(int(pid))
        return (abs(proc.create_time() - float(create_time)) <= SAME_START_TOLERANCE
                and proc.status() != psutil.STATUS_ZOMBIE)
    except (psutil.Error, ValueError, TypeError):
        return False


def wait_gone(pid: int, create_time: float, timeout: float) -> bool:
    """Wait until that process has exited; False if it is still there after ``timeout``."""
    deadline = time.monotonic() + timeout
    while same_process(pid, create_time):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def running_daemon(state: StateDir) -> dict[str, Any] | None:
    """The daemon record of ``state`` if that process is still alive (pid + start time match).
    Lives here, not beside the daemon, so the CLI and clients can ask without importing it."""
    rec = state.load_daemon()
    if not rec or not same_process(rec.get("pid"), rec.get("create_time")):
        return None
    return rec
