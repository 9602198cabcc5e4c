"""`edgemesh bench rpc`: our RPC stack over loopback, CURVE (with ZAP) against plain zmq.

The server runs in its own process (`python -m edgemesh.bench.rpc PORT curve|plain
SERVER_SEED CLIENT_PUBLIC`) so client and server do not share an interpreter; it echoes the
request's tensor frames back for RTT and answers with a byte count for throughput.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from edgemesh.identity.keys import NodeKey
from edgemesh.mesh.rpc import RpcClient, RpcServer
from edgemesh.rpc.dispatch import Call, Reply, RpcStats
from edgemesh.transport.zmq_link import ZmqTransport
from edgemesh.wire.tensor import TensorSpec


async def _serve(port: int, mode: str, seed: bytes, client_public: bytes) -> None:
    key = NodeKey(seed)
    handlers: dict[str, Any] = {}

    async def echo(call: Call) -> Any:
        return Reply({}, [(s, b) for s, b in call.tensors])

    async def sink(call: Call) -> Any:
        return {"n": sum(s.nbytes for s, _ in call.tensors)}

    handlers = {"bench.echo": echo, "bench.sink": sink}
    if mode == "curve":
        transport = ZmqTransport(key)
        transport.start()
        sock = transport.server(f"tcp://127.0.0.1:{port}", "mesh", lambda k: k == client_public)
    else:
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.linger = 500
        sock.bind(f"tcp://127.0.0.1:{port}")
    print("ready", flush=True)
    await RpcServer(sock, b"bench", handlers, RpcStats()).run()


@dataclass
class ModeResult:
    rtt_64_us: float
    rtt_16k_us: float
    mbps_1m: float


async def _client(port: int, mode: str, server_public: bytes, key: NodeKey, iters: int, mib: int) -> ModeResult:
    if mode == "curve":
        transport: Any = ZmqTransport(key)
        sock = transport.client(f"tcp://127.0.0.1:{port}", server_public)
    else:
        transport = zmq.asyncio.Context()
        sock = transport.socket(zmq.DEALER)
        sock.linger = 500
        sock.connect(f"tcp://127.0.0.1:{port}")
    client = RpcClient(sock, b"client")
    reader = asyncio.ensure_future(client.run())
    try:
        async def rtt(nbytes: int) -> float:
            payload = bytes(nbytes)
            spec = TensorSpec("uint8", (nbytes,))
            for _ in range(max(iters // 10, 20)):  # warm-up (and the CURVE handshake)
                await client.call("bench.echo", None, [(spec, payload)], timeout=10)
            samples = []
            for _ in range(iters):
                t = time.perf_counter()
                await client.call("bench.echo", None, [(spec, payload)], timeout=10)
                samples.append(time.perf_counter() - t)
            return statistics.median(samples) * 1e6

        r64 = await rtt(64)
        r16 = await rtt(16 * 1024)
        payload = bytes(1 << 20)
        spec = TensorSpec("uint8", (1 << 20,))
        window = 8
        for _ in range(8):
            await client.call("bench.sink", None, [(spec, payload)], timeout=30)
        t = time.perf_counter()
        sem = asyncio.Semaphore(window)

        async def one() -> None:
            async with sem:
                await client.call("bench.sink", None, [(spec, payload)], timeout=30)

        await asyncio.gather(*(one() for _ in range(mib)))
        mbps = mib * (1 << 20) / (time.perf_counter() - t) / 1e6
        return ModeResult(round(r64, 1), round(r16, 1), round(mbps, 1))
    finally:
        reader.cancel()
        if mode == "curve":
            transport.close()
        else:
            sock.close(500)
            transport.term()


def run_mode(mode: str, port: int, iters: int = 2000, mib: int = 512) -> ModeResult:
    server_key, client_key = NodeKey.generate(), NodeKey.generate()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgemesh.bench.rpc", str(port), mode, server_key.seed.hex(),
         client_key.curve_public.decode()],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if line.strip() != "ready":
            raise RuntimeError(f"bench server did not start: {proc.stderr.read() if proc.stderr else ''}")
        return asyncio.run(_client(port, mode, server_key.curve_public, client_key, iters, mib))
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1]), sys.argv[2], bytes.fromhex(sys.argv[3]), sys.argv[4].encode()))
