"""The device profile: what a node declares (a nodes/*.toml named in settings) at once, and what
it measures (GFLOP/s, memory bandwidth, disk) in a niced child process once the mesh has settled;
both are published in its member record, where the planner reads them.
"""

from __future__ import annotations

import asyncio
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
        await asyncio.sleep(self.node.config.profile_delay)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "edgemesh.mesh.profile", str(self.node.state.path),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                preexec_fn=lambda: os.nice(5),
            )
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), MEASURE_TIMEOUT)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
                log.warning("device profile timed out")
                return
            profile = json.loads(out)
        except (OSError, ValueError) as exc:
            log.warning("could not measure the device profile: %s", exc)
            return
        me = self.membership.me
        self.membership.update_self(profile={**(me.profile if me else {}), **profile})
