"""The device profile: what a node declares (a nodes/*.toml named in settings) at once, and what
it measures (GFLOP/s, memory bandwidth, disk) in a niced child process once the mesh has settled;
both are published in its member record, where the planner reads them.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from edgemesh.config import load_toml
from edgemesh.rpc.dispatch import Handler
from edgemesh.runtime.services import Task
from edgemesh.runtime.services.membership import MembershipService
from edgemesh.runtime.services.node import Node

log = logging.getLogger(__name__)

MEASURE_TIMEOUT = 120.0  # s
# Pauses between measurements, the last one repeating: three close together while the node
# starts (done before a user typically launches anything), then one every 10 minutes.
REMEASURE_S = (5.0, 5.0, 600.0)
KEEP = 3  # published GFLOP/s: the best of this many recent measurements


class ProfileService:
    name = "profile"

    def __init__(self, node: Node, membership: MembershipService) -> None:
        self.node = node
        self.membership = membership

    def declared(self) -> dict[str, Any]:
        """A nodes/*.toml profile named in settings, published as profile["declared"]."""
        path = self.node.state.load_settings().get("profile")
        if not path:
            return {}
        return {"declared": load_toml(Path(path))}

    def handlers(self) -> dict[str, Handler]:
        return {}

    def tasks(self) -> list[Task]:
        return [self._measure]

    async def close(self) -> None:
        pass

    async def _measure(self) -> None:
        """Measure once the mesh has settled, then again after each pause of ``REMEASURE_S`` (the
        last one repeating).
        The published GFLOP/s is the best of the last ``KEEP`` measurements: on a small device
        the first one competes with the daemon's own start (and, on a testbed, with every other
        device's), and whatever else runs only ever slows a measurement down."""
        await asyncio.sleep(self.node.config.profile_delay)
        recent: collections.deque[float] = collections.deque(maxlen=KEEP)
        waits = iter(REMEASURE_S)
        first = True
        while True:
            profile = await self._measure_once(disk=first)
            if profile is not None:
                first = False
                g = profile.get("gflops")
                if isinstance(g, (int, float)) and not isinstance(g, bool) and g > 0:
                    recent.append(float(g))
                if recent:
                    profile["gflops"] = max(recent)
                me = self.membership.me
                self.membership.update_self(profile={**(me.profile if me else {}), **profile})
            await asyncio.sleep(next(waits, REMEASURE_S[-1]))

    async def _measure_once(self, *, disk: bool) -> dict[str, Any] | None:
        """One run of the measuring child (``disk``: also the disk read speed, only the first
        time: it writes a 32 MB file); None if it failed or timed out."""
        argv = [sys.executable, "-m", "edgemesh.mesh.profile", str(self.node.state.path)]
        if not disk:
            argv.append("--no-disk")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                preexec_fn=lambda: os.nice(5),
            )
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), MEASURE_TIMEOUT)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
                log.warning("device profile timed out")
                return None
            profile = json.loads(out)
        except (OSError, ValueError) as exc:
            log.warning("could not measure the device profile: %s", exc)
            return None
        return profile if isinstance(profile, dict) else None
