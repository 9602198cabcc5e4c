"""The CLI's channel to its own daemon: the mesh port, authenticated with the node's own key."""

from __future__ import annotations

import asyncio
from typing import Any

from edgemesh.errors import EdgemeshError, NotRunningError, RpcError
from edgemesh.identity.statedir import StateDir
from edgemesh.mesh.rpc import rpc_session
from edgemesh.runtime.processes import running_daemon
from edgemesh.transport.zmq_link import ZmqTransport


async def control_call(state: StateDir, method: str, body: Any = None, timeout: float = 5.0) -> Any:
    rec = running_daemon(state)
    if rec is None:
        raise NotRunningError(
            f"no edgemesh daemon is running for {state.path}; start it with "
            f"`edgemesh start --state-dir {state.path}`")
    key, _ = state.load_identity()
    transport = ZmqTransport(key)
    try:
        async with rpc_session(transport, str(rec["control"]), key.curve_public, bytes.fromhex(key.node_id)) as client:
            body, _ = await client.call(method, body, timeout=timeout)
            return body
    except RpcError as exc:
        raise EdgemeshError(f"the daemon for {state.path} did not answer {method}: {exc}") from None
    finally:
        transport.close()


def control(state: StateDir, method: str, body: Any = None, timeout: float = 5.0) -> Any:
    return asyncio.run(control_call(state, method, body, timeout))
