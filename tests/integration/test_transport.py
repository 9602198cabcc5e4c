"""zmq transport: CURVE servers behind ZAP, made and closed repeatedly in one event loop."""

from __future__ import annotations

import asyncio

import pytest

from edgemesh.errors import RpcError, RpcTimeout
from edgemesh.identity.keys import NodeKey
from edgemesh.mesh.rpc import RpcClient, RpcServer
from edgemesh.rpc.dispatch import RpcStats
from edgemesh.transport.zmq_link import ZmqTransport

pytestmark = pytest.mark.integration


async def _one_round(server_key: NodeKey, client_key: NodeKey, allowed: bool) -> object:
    async def ping(call):  # type: ignore[no-untyped-def]
        return {"pong": True}

    server = ZmqTransport(server_key)
    server.start()
    sock = server.server("tcp://127.0.0.1:0", "data", lambda k: allowed and k == client_key.curve_public)
    serving = asyncio.ensure_future(RpcServer(sock, b"s", {"ping": ping}, RpcStats()).run())
    client = ZmqTransport(client_key)
    rpc = RpcClient(client.client(server.bound_endpoint(sock), server_key.curve_public), b"c")
    reading = asyncio.ensure_future(rpc.run())
    try:
        # An allowed key is answered within milliseconds: 20 s only ends a hang on a loaded host.
        # A refused key's expected outcome is the timeout, so it stays short.
        body, _ = await rpc.call("ping", {}, timeout=20.0 if allowed else 2.0)
        return body
    finally:
        reading.cancel()
        serving.cancel()
        await asyncio.gather(reading, serving, return_exceptions=True)
        await client.aclose()
        await server.aclose()


def test_servers_can_be_made_again_and_again_in_one_loop():
    """Regression: the second ZAP handler in a process went deaf (its fd's reader was removed
    by the first handler's late cancellation cleanup) and every handshake hung."""
    a, b = NodeKey.generate(), NodeKey.generate()

    async def main() -> list[object]:
        return [await _one_round(a, b, True) for _ in range(4)]

    assert asyncio.run(main()) == [{"pong": True}] * 4


def test_a_refused_key_gets_no_answer():
    a, b = NodeKey.generate(), NodeKey.generate()
    with pytest.raises(RpcTimeout):
        asyncio.run(_one_round(a, b, False))


def test_a_call_on_a_link_closed_under_its_caller_raises_a_typed_error():
    """Regression: a member's link closed (it left, or was removed) while the link-probe loop
    still held it; the next call raised zmq's ENOTSOCK, which ended the loop and, with it,
    the daemon of a member that stayed."""
    a, b = NodeKey.generate(), NodeKey.generate()

    async def main() -> None:
        client = ZmqTransport(b)
        rpc = RpcClient(client.client("tcp://127.0.0.1:9", a.curve_public), b"c")
        rpc.sock.close(linger=0)
        try:
            with pytest.raises(RpcError) as err:
                await rpc.call("link.probe", {}, timeout=5.0)
            assert err.value.code == "closed" and "link.probe" in str(err.value)
            assert rpc.notify("gossip.push", {}) is False
        finally:
            await client.aclose()

    asyncio.run(main())
