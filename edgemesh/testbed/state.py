"""The state file: every resource a testbed created, written as it is created.

JSON, rewritten atomically (temp file + rename) on every change, so a runner SIGKILLed at any
moment leaves a readable file listing at least everything that exists. Processes are recorded
with their kernel start time so a recycled pid is never mistaken for ours.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgemesh.errors import ConfigError
from edgemesh.testbed.naming import Names
from edgemesh.testbed.steps import Kind, Resource


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks), or None if the pid is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


@dataclass
class Record:
    kind: str
    name: str
    pid: int | None = None
    start_time: int | None = None
    netns: str | None = None

    def resource(self) -> Resource:
        return Resource(Kind(self.kind), self.name)

    def is_alive(self) -> bool:
        """For process records: the same process (pid *and* start time) still exists."""
        return self.pid is not None and process_start_time(self.pid) == self.start_time


@dataclass
class TestbedState:
    prefix: str
    scenario: str
    run_root: str
    created_at: float = field(default_factory=time.time)
    phase: str = "building"  # building | up | failed
    records: list[Record] = field(default_factory=list)
    daemons: dict[str, str] = field(default_factory=dict)  # device -> daemon state dir (recorded before start)
    started: list[str] = field(default_factory=list)  # devices whose daemon start succeeded

    def names(self) -> Names:
        return Names(self.prefix, Path(self.run_root))

    def of_kind(self, kind: Kind) -> list[Record]:
        return [r for r in self.records if r.kind == kind.value]


class StateFile:
    """Owns the state of one testbed; every mutation is persisted before it returns."""

    def __init__(self, path: Path, state: TestbedState) -> None:
        self.path = path
        self.state = state

    @classmethod
    def create(cls, names: Names, scenario: str) -> StateFile:
        if names.state_file.exists():
            raise ConfigError(
                f"a testbed with prefix {names.prefix!r} already exists ({names.state_file}); "
                f"run `edgemesh testbed down` first, or pick another --prefix"
            )
        names.run_dir.mkdir(parents=True, exist_ok=True)
        state = TestbedState(prefix=names.prefix, scenario=scenario, run_root=str(names.run_root))
        state.records.append(Record(Kind.DIR.value, str(names.run_dir)))
        sf = cls(names.state_file, state)
        sf.save()
        return sf

    @classmethod
    def load(cls, names: Names) -> StateFile | None:
        try:
            data: dict[str, Any] = json.loads(names.state_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"testbed state file {names.state_file} is unreadable ({exc}); `testbed down` still sweeps by prefix") from None
        records = [Record(**r) for r in data.pop("records", [])]
        return cls(names.state_file, TestbedState(**data, records=records))

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.state), indent=1))
        os.replace(tmp, self.path)

    def record(self, resource: Resource) -> None:
        if any(r.kind == resource.kind.value and r.name == resource.name for r in self.state.records):
            return
        self.state.records.append(Record(resource.kind.value, resource.name))
        self.save()

    def record_process(self, label: str, pid: int, netns: str | None = None) -> None:
        self.state.records.append(Record(Kind.PROCESS.value, label, pid, process_start_time(pid), netns))
        self.save()

    def set_phase(self, phase: str) -> None:
        self.state.phase = phase
        self.save()

    def set_daemon(self, device: str, state_dir: str) -> None:
        self.state.daemons[device] = state_dir
        self.save()

    def mark_started(self, device: str) -> None:
        if device not in self.state.started:
            self.state.started.append(device)
            self.save()
