"""The daemon's worker processes: one per job it takes part in, ended by pid."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any

import msgpack

from edgemesh.identity.statedir import StateDir
from edgemesh.runtime.jobs import JobSpec

log = logging.getLogger(__name__)

MAX_JOBS = 8


class WorkerManager:
    def __init__(self, state: StateDir, host: str, advertise: str) -> None:
        self.state = state
        self.host = host  # where a worker's collective socket listens (the daemon's listen address)
        self.advertise = advertise  # the address it tells the other ranks
        self.dir = state.path / "jobs"
        self._procs: dict[str, tuple[JobSpec, subprocess.Popen[bytes]]] = {}

    def start(self, spec: JobSpec) -> int:
        self.reap()
        if spec.job in self._procs:
            return self._procs[spec.job][1].pid
        if len(self._procs) >= MAX_JOBS:
            from edgemesh.errors import EdgemeshError

            raise EdgemeshError(f"this node already runs {MAX_JOBS} jobs")
        self.dir.mkdir(parents=True, exist_ok=True)
        job_file = self.dir / f"{spec.job}-r{spec.rank}.msgpack"
        job_file.write_bytes(msgpack.packb(spec.to_wire(), use_bin_type=True))
        with open(self.dir / f"{spec.job}-r{spec.rank}.log", "ab") as logf:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edgemesh.runtime.worker_main", "--state-dir", str(self.state.path),
                 "--job", str(job_file), "--host", self.host, "--advertise", self.advertise],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._procs[spec.job] = (spec, proc)
        log.info("started worker rank %d of job %s (pid %d)", spec.rank, spec.job, proc.pid)
        return proc.pid

    def stop(self, job: str, timeout: float = 5.0) -> bool:
        entry = self._procs.pop(job, None)
        if entry is None:
            return False
        _, proc = entry
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return True

    def owner(self, job: str) -> bytes | None:
        """The signing key of the member that started ``job`` (it serves the job's weights)."""
        entry = self._procs.get(job)
        return entry[0].server_key if entry is not None else None

    def owned_by(self, key: bytes) -> list[str]:
        """The jobs started by the member with signing key ``key``."""
        return [job for job, (spec, _) in self._procs.items() if spec.server_key == key]

    def stop_all(self) -> None:
        for job in list(self._procs):
            self.stop(job, timeout=3.0)

    def reap(self) -> None:
        for job, (spec, proc) in list(self._procs.items()):
            if proc.poll() is not None:
                log.info("worker of job %s exited with %s", job, proc.returncode)
                del self._procs[job]

    def jobs(self) -> list[dict[str, Any]]:
        self.reap()
        return [{"job": j, "rank": s.rank, "model": s.model, "pid": p.pid} for j, (s, p) in self._procs.items()]
