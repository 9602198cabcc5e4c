"""Start a daemon detached (a child process in its own session) and wait until it serves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from edgemesh.errors import EdgemeshError
from edgemesh.identity.statedir import StateDir
from edgemesh.runtime.processes import running_daemon
from edgemesh.runtime.processes import same_process, wait_gone

READY_TIMEOUT = 20.0


def stop_daemon(state: StateDir, timeout: float = 10.0) -> bool:
    """Ask the daemon to stop; fall back to SIGTERM, then SIGKILL, of its recorded pid.
    False if no daemon was running for ``state``."""
    from edgemesh.runtime.control import control

    rec = running_daemon(state)
    if rec is None:
        return False
    pid, started = int(rec["pid"]), float(rec["create_time"])
    try:
        control(state, "admin.stop", timeout=3.0)
    except EdgemeshError:
        _signal(pid, started, signal.SIGTERM)
    if not wait_gone(pid, started, timeout):
        _signal(pid, started, signal.SIGKILL)
        wait_gone(pid, started, 3.0)
        state.clear_daemon()
    return True


def _signal(pid: int, started: float, sig: int) -> None:
    if same_process(pid, started):  # never a pid that has been reused meanwhile
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def daemon_argv(state: StateDir, host: str, port: int, advertise: str | None, mdns: bool) -> list[str]:
    argv = [sys.executable, "-m", "edgemesh.runtime.daemon_main", "--state-dir", str(state.path),
            "--host", host, "--port", str(port)]
    if advertise:
        argv += ["--advertise", advertise]
    if not mdns:
        argv.append("--no-mdns")
    return argv


def ensure_not_running(state: StateDir) -> None:
    rec = running_daemon(state)
    if rec is not None:
        raise EdgemeshError(
            f"a daemon is already running for {state.path} (pid {rec['pid']}); "
            f"stop it with `edgemesh stop --state-dir {state.path}`")


def start_detached(state: StateDir, host: str, port: int, advertise: str | None, mdns: bool) -> int:
    """Spawn the daemon, wait until it has bound its ports, return its pid."""
    return wait_ready(state, spawn(state, host, port, advertise, mdns))


def spawn(state: StateDir, host: str, port: int, advertise: str | None, mdns: bool) -> subprocess.Popen[bytes]:
    ensure_not_running(state)
    for name in (StateDir.ERROR,):
        try:
            state.file(name).unlink()
        except FileNotFoundError:
            pass
    log = open(state.file(StateDir.LOG), "ab")
    try:
        proc = subprocess.Popen(
            daemon_argv(state, host, port, advertise, mdns),
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    finally:
        log.close()
    return proc


def wait_ready(state: StateDir, proc: subprocess.Popen[bytes], timeout: float = READY_TIMEOUT) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = running_daemon(state)
        if rec is not None and rec.get("pid") == proc.pid:
            return proc.pid
        code = proc.poll()
        if code is not None:
            err = state.file(StateDir.ERROR)
            reason = err.read_text().strip() if err.exists() else f"exit code {code}; see {state.file(StateDir.LOG)}"
            raise EdgemeshError(f"the daemon did not start: {reason}")
        time.sleep(0.05)
    proc.terminate()
    raise EdgemeshError(f"the daemon did not become ready within {timeout:.0f} s; see {state.file(StateDir.LOG)}")
