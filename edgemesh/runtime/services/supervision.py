"""Supervision of coturn, the STUN/TURN server a node runs beside itself (``init --turn``):
written config (it holds the TURN secret), restarted when it dies, its URLs published in our record.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil

from edgemesh.nat.turn import TURN_PORT, coturn_argv, coturn_config, turn_secret
from edgemesh.rpc.dispatch import Handler
from edgemesh.runtime.services import Task
from edgemesh.runtime.services.node import Node

log = logging.getLogger(__name__)

RESTART_AFTER = 5.0  # s
TERM_GRACE = 3.0  # s between SIGTERM and SIGKILL when the daemon stops


class CoturnService:
    name = "supervision"

    def __init__(self, node: Node) -> None:
        self.node = node
        self.enabled = node.settings.get("turn") == "local"
        self.pid: int | None = None

    def published_servers(self) -> list[str]:
        """STUN/TURN URLs this node serves, for its member record."""
        if not self.enabled:
            return []
        return [f"stun:{self.node.advertise}:{TURN_PORT}", f"turn:{self.node.advertise}:{TURN_PORT}"]

    def handlers(self) -> dict[str, Handler]:
        return {}

    def tasks(self) -> list[Task]:
        return [self._run_coturn] if self.enabled else []

    async def close(self) -> None:
        pass  # the task ends coturn when it is cancelled

    async def _run_coturn(self) -> None:
        node = self.node
        binary = shutil.which("turnserver")
        if binary is None:
            log.error("`init --turn` asked for coturn but `turnserver` is not installed (apt-get install coturn)")
            return
        conf = node.state.file("turnserver.conf")
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the TURN secret
        with os.fdopen(fd, "w") as fh:
            fh.write(coturn_config(node.advertise, turn_secret(node.cluster.secret), node.state.file("turnserver.log")))
        while True:
            proc = await asyncio.create_subprocess_exec(
                *coturn_argv(binary, conf), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            self.pid = proc.pid
            try:
                code = await proc.wait()
            finally:
                if proc.returncode is None:
                    proc.terminate()
                    try:
                        await asyncio.wait_for(proc.wait(), TERM_GRACE)
                    except asyncio.TimeoutError:
                        proc.kill()
                        await proc.wait()
                self.pid = None
            log.warning("coturn exited with code %s; restarting it in %g s", code, RESTART_AFTER)
            await asyncio.sleep(RESTART_AFTER)
