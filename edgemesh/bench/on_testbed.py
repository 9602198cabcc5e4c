"""``bench generate --testbed SCENARIO``: the same benchmark on a testbed's devices.

Brings the scenario up under a fresh prefix (root), starts an edgemesh daemon in every device
(`init` on the first, `join` on the others, as `testbed run` does), copies the model's store
entry into the first device's store, waits until enough members are alive with measured links,
then runs ``edgemesh bench generate`` inside the first device (its namespace and CPU/memory
caps): "1 device" is that device alone, "N devices" the first N of the scenario's devices.
``close()`` removes everything, and the caller calls it on every exit path.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from edgemesh.errors import ConfigError, EdgemeshError

READY_TIMEOUT = 180.0  # s for the members to be alive with a probed link (0.5-core devices)


class GenerateBed:
    """A testbed with a daemon per device and one model in the first device's store."""

    def __init__(self, scenario_path: Path, progress: Callable[[str], None]) -> None:
        from edgemesh.testbed.host import probe_host
        from edgemesh.testbed.naming import Names
        from edgemesh.testbed.scenario import load_scenario

        if os.geteuid() != 0:
            raise ConfigError("--testbed needs root (it creates network namespaces and cgroups)")
        self.scenario = load_scenario(scenario_path)
        self.names = Names("bg" + secrets.token_hex(2))
        self.caps = probe_host()
        self.first = self.scenario.devices[0].name
        self.progress = progress
        self.state: Any = None

    def open(self, nodes: int) -> None:
        from edgemesh.testbed.lifecycle import start_daemons, up

        if nodes > len(self.scenario.devices):
            raise ConfigError(f"--nodes {nodes}: scenario {self.scenario.name!r} has "
                              f"{len(self.scenario.devices)} device(s)")
        self.progress(f"bringing up testbed {self.scenario.name} (prefix {self.names.prefix})")
        self.state = up(self.scenario, self.names, self.caps)  # tears down itself if it fails
        start_daemons(self.scenario, self.state, self.caps,
                      on_device=lambda d: self.progress(f"starting the edgemesh daemon on {d}"))

    def install(self, entry_root: Path) -> None:
        """The store entry (a directory of block files and a manifest), copied as it is."""
        dest = self.names.device_dir(self.first) / "models" / entry_root.name
        self.progress(f"copying {entry_root.name} into {self.first}'s store")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(entry_root, dest)

    def wait_members(self, nodes: int, timeout: float = READY_TIMEOUT) -> None:
        """Until the first device sees ``nodes`` members alive, each other one with a probed link
        (the cost model and the planner read those)."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            members = self._status().get("members", [])
            ready = [m for m in members if m.get("state") == "alive"
                     and (m.get("self") or (m.get("links") or {}).get("mbps"))]
            seen = len(ready)
            self.progress(f"waiting for the members: {seen}/{nodes} alive with a measured link")
            if seen >= nodes:
                return
            if time.monotonic() > deadline:
                raise EdgemeshError(f"only {seen} of {nodes} members were alive with a measured link after "
                                    f"{timeout:.0f} s on testbed {self.scenario.name}")
            time.sleep(3.0)

    def run_bench(self, args: list[str]) -> dict[str, Any]:
        """``edgemesh bench generate ARGS --json -`` in the first device; its JSON."""
        from edgemesh.testbed.lifecycle import run_in_device

        self.progress(f"running the benchmark in {self.first}")
        res = run_in_device(self.scenario, self.names, self.caps, self.first,
                            ["edgemesh", "bench", "generate", *args, "--json", "-"], capture=True)
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
            raise EdgemeshError(f"bench generate in {self.first} failed: {' '.join(tail) or 'no output'}")
        try:
            return json.loads(res.stdout)
        except ValueError:
            raise EdgemeshError(f"bench generate in {self.first} printed no JSON: {res.stdout[-300:]!r}") from None

    def _status(self) -> dict[str, Any]:
        from edgemesh.testbed.lifecycle import run_in_device

        res = run_in_device(self.scenario, self.names, self.caps, self.first, ["edgemesh", "status", "--json", "-"],
                            capture=True, timeout=60)
        try:
            return json.loads(res.stdout) if res.returncode == 0 else {}
        except ValueError:
            return {}

    def close(self) -> None:
        from edgemesh.testbed.lifecycle import edgemesh_argv
        from edgemesh.testbed.teardown import teardown

        if self.state is not None:
            self.progress(f"tearing down testbed {self.scenario.name}")
            teardown(self.names, self.caps.cgroups, edgemesh_argv(self.caps.python))
            self.state = None
