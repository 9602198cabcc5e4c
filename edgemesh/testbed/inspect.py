"""``testbed status``: what of a testbed exists right now, read from the state file and the system."""

from __future__ import annotations

from typing import Any

from edgemesh.testbed.addressing import AddressPlan
from edgemesh.testbed.build import link_spec_summary
from edgemesh.testbed.cgroups import CgroupLayout
from edgemesh.testbed.naming import Names
from edgemesh.testbed.scenario import Scenario
from edgemesh.testbed.state import StateFile
from edgemesh.testbed.steps import Kind
from edgemesh.testbed.teardown import our_namespaces


def _read_int(path: Any) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def inspect(scenario: Scenario, names: Names, layout: CgroupLayout | None) -> dict[str, Any]:
    state = StateFile.load(names)
    plan = AddressPlan(scenario)
    namespaces = our_namespaces(names)
    devices = []
    for dev in scenario.devices:
        site = scenario.site(dev.site)
        used = limit = None
        procs = 0
        if layout is not None:
            dirs = layout.device_dirs(names, dev.name)
            mem = dirs[0]
            if layout.version == 1:
                used = _read_int(mem / "memory.usage_in_bytes")
                limit = _read_int(mem / "memory.limit_in_bytes")
            else:
                used = _read_int(mem / "memory.current")
                limit = _read_int(mem / "memory.max")
            try:
                procs = len((mem / "cgroup.procs").read_text().split())
            except OSError:
                procs = 0
        devices.append({
            "name": dev.name,
            "site": dev.site,
            "nat": site.nat.value,
            "profile": dev.profile,
            "netns": names.device_ns(dev.name),
            "exists": names.device_ns(dev.name) in namespaces,
            "address": str(plan.device_address(dev.name)),
            "public": str(plan.public_address(dev.name)),
            "link": link_spec_summary(dev.link),
            "cpus": dev.cpus,
            "memory_used_mib": None if used is None else used // (1024 * 1024),
            # v1 reports "no limit" as a huge number; anything beyond 1 PiB is no limit.
            "memory_limit_mib": None if limit is None or limit >= 1 << 50 else limit // (1024 * 1024),
            "processes": procs,
        })
    helpers = []
    if state is not None:
        for rec in state.state.of_kind(Kind.PROCESS):
            helpers.append({"label": rec.name, "pid": rec.pid, "alive": rec.is_alive()})
    return {
        "scenario": scenario.name,
        "prefix": names.prefix,
        "phase": state.state.phase if state else None,
        "namespaces": namespaces,
        "devices": devices,
        "helpers": [h for h in helpers if h["alive"] or not h["label"].startswith("probe")],
        "daemons": dict(state.state.daemons) if state else {},
    }
