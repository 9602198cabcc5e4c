"""The testbed plan as data: commands to run, files to write, processes to start.

Builders return lists of these; the executor runs them. A step that creates something names
it in ``creates`` and the executor records it in the state file *before* running the step,
so a runner killed half-way still leaves a complete list for ``down`` (removing something
that was never created is a no-op there).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from enum import Enum


class Kind(str, Enum):
    NETNS = "netns"
    CGROUP = "cgroup"
    PROCESS = "process"
    DIR = "dir"


@dataclass(frozen=True)
class Resource:
    kind: Kind
    name: str  # netns name, cgroup directory, process label, directory path


@dataclass(frozen=True)
class Run:
    """Run ``argv``; ``stdin`` is fed to it (``nft -f -`` rulesets)."""

    argv: tuple[str, ...]
    stage: str = ""
    creates: Resource | None = None
    stdin: str | None = None

    def render(self) -> str:
        text = shlex.join(self.argv)
        if self.stdin is not None:
            body = self.stdin.rstrip("\n")
            text += f" <<'EOF'\n{body}\nEOF"
        return text


@dataclass(frozen=True)
class Write:
    """Write ``value`` to a file (cgroup knobs, sysfs)."""

    path: str
    value: str
    stage: str = ""
    creates: Resource | None = None

    def render(self) -> str:
        return f"echo {shlex.quote(self.value)} > {shlex.quote(self.path)}"


@dataclass(frozen=True)
class MakeDir:
    path: str
    stage: str = ""
    creates: Resource | None = None

    def render(self) -> str:
        return f"mkdir -p {shlex.quote(self.path)}"


@dataclass(frozen=True)
class Spawn:
    """Start a long-lived helper (delay wire, coturn) in its own session; its pid is recorded.

    ``ready`` is a line the process prints on stdout once it is up; ``None`` means "give it
    ``settle_s`` seconds and check it is still alive".
    """

    argv: tuple[str, ...]
    label: str
    stage: str = ""
    ready: str | None = "ready"
    settle_s: float = 0.3
    log: str | None = None
    env: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def creates(self) -> Resource:
        return Resource(Kind.PROCESS, self.label)

    def render(self) -> str:
        return f"{shlex.join(self.argv)} &  # {self.label}"


Step = Run | Write | MakeDir | Spawn
