"""Runs built steps, recording what each creates in the state file *before* creating it.

Deliberately thin: no decisions here beyond "run it, and stop at the first failure with the
command and its error". Commands are argv lists, never shell strings.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from edgemesh.errors import EdgemeshError
from edgemesh.testbed.state import StateFile
from edgemesh.testbed.steps import MakeDir, Run, Spawn, Step, Write

READY_TIMEOUT_S = 15.0


class StepFailed(EdgemeshError):
    """A testbed command failed; the message has the command and what it printed."""

    exit_code = 5


def _tail(path: str | None, lines: int = 5) -> str:
    if not path:
        return ""
    try:
        return " | ".join(Path(path).read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


class Executor:
    def __init__(self, state: StateFile, on_step: Callable[[Step], None] | None = None) -> None:
        self.state = state
        self.on_step = on_step

    def run_all(self, steps: Iterable[Step]) -> None:
        for step in steps:
            if self.on_step is not None:
                self.on_step(step)
            self.run(step)

    def run(self, step: Step) -> None:
        if step.creates is not None and not isinstance(step, Spawn):
            self.state.record(step.creates)
        if isinstance(step, Run):
            result = subprocess.run(list(step.argv), input=step.stdin, capture_output=True, text=True)
            if result.returncode != 0:
                detail = (result.stderr or result.stdout).strip().replace("\n", " | ")
                raise StepFailed(f"`{step.render().splitlines()[0]}` failed ({result.returncode}): {detail}")
        elif isinstance(step, Write):
            try:
                Path(step.path).write_text(step.value)
            except OSError as exc:
                raise StepFailed(f"cannot write {step.value!r} to {step.path}: {exc.strerror}") from None
        elif isinstance(step, MakeDir):
            os.makedirs(step.path, exist_ok=True)
        elif isinstance(step, Spawn):
            self._spawn(step)
        else:  # pragma: no cover - the Step union is closed
            raise TypeError(step)

    def _spawn(self, step: Spawn) -> None:
        log = open(step.log, "ab") if step.log else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(
                list(step.argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if step.ready else subprocess.DEVNULL,
                stderr=log,
                # Own session: Ctrl-C on the CLI must not take the testbed's helpers with it;
                # they are ended by `down`, by recorded pid.
                start_new_session=True,
                env={**os.environ, **dict(step.env)},
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()  # type: ignore[union-attr]
        self.state.record_process(step.label, proc.pid)
        if step.ready is None:
            time.sleep(step.settle_s)
            if proc.poll() is not None:
                raise StepFailed(f"{step.label} exited with {proc.returncode} right after start: {_tail(step.log)}")
            return
        assert proc.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        line = b""
        while time.monotonic() < deadline:
            readable, _, _ = select.select([proc.stdout], [], [], 0.1)
            if readable:
                line = proc.stdout.readline()
                break
            if proc.poll() is not None:
                break
        proc.stdout.close()
        if line.strip() != step.ready.encode():
            raise StepFailed(f"{step.label} did not start (exit {proc.poll()}): {_tail(step.log)}")
