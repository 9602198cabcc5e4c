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
from typing import Any, AsyncIterator

from edgemesh.config import load_toml
from edgemesh.rpc.dispatch import Handler
from edgemesh.runtime.services import Task
from edgemesh.runtime.services.membership import MembershipService
from edgemesh.runtime.services.node import Node

log = logging.getLogger(__name__)

MEASURE_TIMEOUT = 120.0  # s
# Three measurements close together while the node starts (done before a user typically
# launches anything; one torch import for all three), then one every 10 minutes.
STARTUP_MEASUREMENTS = 3
PAUSE_S = 5.0
REMEASURE_S = 600.0
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
        """Measure once the mesh has settled (``STARTUP_MEASUREMENTS`` times, ``PAUSE_S`` apart,
        in one child), then once every ``REMEASURE_S``. Each measurement is published as it
        arrives, with the best GFLOP/s of the last ``KEEP``: on a small device the first one
        competes with the daemon's own start (and, on a testbed, with every other device's),
        and whatever else runs only ever slows a measurement down."""
        await asyncio.sleep(self.node.config.profile_delay)
        recent: collections.deque[float] = collections.deque(maxlen=KEEP)
        first = True
        count = 0
        while True:
            async for profile in self._measurements(first):
                g = profile.get("gflops")
                if isinstance(g, (int, float)) and not isinstance(g, bool) and g > 0:
                    recent.append(float(g))
                if recent:
                    profile["gflops"] = max(recent)
                count += 1
                # How many so far: a benchmark waits for the start-up series (it loads the CPU).
                profile["measurements"] = count
                me = self.membership.me
                self.membership.update_self(profile={**(me.profile if me else {}), **profile})
            first = False
            await asyncio.sleep(REMEASURE_S)

    async def _measurements(self, first: bool) -> AsyncIterator[dict[str, Any]]:
        """The measuring child's profiles, one per line as it makes them. ``first``: the start-up
        series, with the disk read speed in the first (it writes a 32 MB file: only then).
        Stops early, with a warning, if the child fails or a measurement takes too long; the
        child never outlives this (also when the daemon stops meanwhile)."""
        argv = [sys.executable, "-m", "edgemesh.mesh.profile", str(self.node.state.path),
                "--repeat", str(STARTUP_MEASUREMENTS if first else 1), "--pause", str(PAUSE_S)]
        if not first:
            argv.append("--no-disk")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                preexec_fn=lambda: os.nice(5),
            )
        except OSError as exc:
            log.warning("could not measure the device profile: %s", exc)
            return
        try:
            assert proc.stdout is not None
            while True:
                try:
                    line = await asyncio.wait_for(proc.stdout.readline(), MEASURE_TIMEOUT)
                except asyncio.TimeoutError:
                    log.warning("device profile timed out")
                    return
                if not line:
                    return
                try:
                    profile = json.loads(line)
                except ValueError as exc:
                    log.warning("could not read the device profile: %s", exc)
                    return
                if isinstance(profile, dict):
                    yield profile
        finally:
            if proc.returncode is None:
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass  # it exited on its own meanwhile: wait() reaps it
            await proc.wait()
