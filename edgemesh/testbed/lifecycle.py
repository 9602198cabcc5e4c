"""Bring a testbed up, run things in its devices, start edgemesh daemons inside it.

The glue between the pure builders and the executor; the CLI calls only these functions.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from edgemesh.config import TestbedSettings
from edgemesh.errors import ConfigError, EdgemeshError
from edgemesh.testbed.addressing import AddressPlan
from edgemesh.testbed.build import build_up
from edgemesh.testbed.executor import Executor, StepFailed
from edgemesh.testbed.host import HostCaps
from edgemesh.testbed.naming import Names
from edgemesh.testbed.scenario import Scenario
from edgemesh.testbed.state import StateFile
from edgemesh.testbed.steps import Step
from edgemesh.testbed.teardown import teardown

DAEMON_PORT = TestbedSettings().daemon_port


def daemon_state_dir(names: Names, device: str) -> Path:
    """Where a device's node lives: $EDGEMESH_HOME/node, with EDGEMESH_HOME set per device."""
    return names.device_dir(device) / "node"


def edgemesh_argv(python: str | None = None) -> list[str]:
    """How to call the edgemesh CLI of *this* installation from inside a namespace."""
    python = python or sys.executable
    script = Path(python).parent / "edgemesh"
    if script.exists():
        return [str(script)]
    return [python, "-c", "from edgemesh.cli import main; main()"]


def up(scenario: Scenario, names: Names, caps: HostCaps, on_step: Callable[[Step], None] | None = None,
       *, keep_on_failure: bool = False) -> StateFile:
    steps = build_up(scenario, names, caps)
    state = StateFile.create(names, str(scenario.source or scenario.name))
    try:
        Executor(state, on_step).run_all(steps)
    except BaseException:
        state.set_phase("failed")
        if not keep_on_failure:
            teardown(names, caps.cgroups)
        raise
    state.set_phase("up")
    return state


def require_up(names: Names) -> StateFile:
    state = StateFile.load(names)
    if state is None:
        raise ConfigError(f"no testbed with prefix {names.prefix!r} is up; start it with `edgemesh testbed up SCENARIO`")
    if state.state.phase != "up":
        raise ConfigError(f"testbed {names.prefix!r} is {state.state.phase!r}, not up; run `edgemesh testbed down` and `up` again")
    return state


def device_argv(names: Names, caps: HostCaps, device: str, command: Sequence[str]) -> list[str]:
    """argv that runs ``command`` in ``device``'s namespace and cgroups."""
    argv = [caps.python, "-m", "edgemesh.testbed.enter", "--netns", names.device_ns(device)]
    if caps.cgroups is not None:
        for d in caps.cgroups.device_dirs(names, device):
            argv += ["--cgroup", str(d)]
    command = list(command)
    if command and command[0] == "edgemesh":
        command = edgemesh_argv(caps.python) + command[1:]
    return argv + ["--", *command]


def device_env(scenario: Scenario, names: Names, device: str) -> dict[str, str]:
    """The caller's environment plus what the device is; the caps themselves are in its cgroup."""
    dev = scenario.device(device)
    env = dict(os.environ)
    env["EDGEMESH_TESTBED_DEVICE"] = device
    env["EDGEMESH_TESTBED_SCENARIO"] = scenario.name
    # `edgemesh status` etc. inside a device find that device's node without --state-dir.
    env["EDGEMESH_HOME"] = str(names.device_dir(device))
    if dev.profile:
        env["EDGEMESH_TESTBED_PROFILE"] = dev.profile
    return env


def run_in_device(scenario: Scenario, names: Names, caps: HostCaps, device: str, command: Sequence[str],
                  *, capture: bool = False, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    scenario.device(device)  # a clear error for an unknown device
    return subprocess.run(device_argv(names, caps, device, command), env=device_env(scenario, names, device),
                          capture_output=capture, text=True, timeout=timeout)


def daemons_available(python: str | None = None) -> bool:
    """Does this installation have `edgemesh init` yet? (built in parallel with the testbed)"""
    result = subprocess.run([*edgemesh_argv(python), "init", "--help"], capture_output=True, text=True)
    return result.returncode == 0 and "--token-file" in result.stdout


def start_daemons(scenario: Scenario, state: StateFile, caps: HostCaps, *, timeout: float = 60.0,
                  on_device: Callable[[str], None] | None = None) -> None:
    """Bootstrap on the first device, every other device joins with the token."""
    names = state.state.names()
    plan = AddressPlan(scenario)
    first, *rest = scenario.devices
    token_file = names.run_dir / "join-token"
    for dev in scenario.devices:
        if dev.name in state.state.started:
            continue
        if on_device is not None:
            on_device(dev.name)
        state_dir = daemon_state_dir(names, dev.name)
        common = ["--state-dir", str(state_dir), "--host", str(plan.device_address(dev.name)),
                  "--port", str(DAEMON_PORT), "--name", dev.name, "--detach"]
        if dev is first:
            command = ["edgemesh", "init", *common, "--token-file", str(token_file)]
        else:
            if not token_file.exists():
                raise EdgemeshError(f"the bootstrap on {first.name} wrote no join token to {token_file}")
            command = ["edgemesh", "join", token_file.read_text().strip(), *common]
        state.set_daemon(dev.name, str(state_dir))  # recorded before it exists: `down` stops it
        result = run_in_device(scenario, names, caps, dev.name, command, capture=True, timeout=timeout)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise StepFailed(f"edgemesh daemon on {dev.name} did not start: {detail[0]}")
        state.mark_started(dev.name)
    del rest
