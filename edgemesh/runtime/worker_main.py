"""A tensor-parallel worker: `python -m edgemesh.runtime.worker_main --state-dir S --job FILE`.

Started by a node's daemon for one job. It fetches its weight slices from the launcher (hash
checked, cached by hash), binds its collective socket, reports ready, joins the group and then
follows the master: `forward` (run my slices of every layer), `noop` (keep-alive while idle),
`probe` / `solo` (measurements for `bench generate`), `stop`. Any failure of the group ends the process; the launcher re-plans.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import time
from pathlib import Path

import msgpack

from edgemesh.errors import EdgemeshError
from edgemesh.identity.keys import NodeKey, curve_public_for
from edgemesh.identity.statedir import StateDir
from edgemesh.mesh.rpc import RpcClient, rpc_session
from edgemesh.runtime.jobs import JobSpec
from edgemesh.runtime.cpu import pin_to_slot
from edgemesh.transport.addresses import is_wildcard
from edgemesh.transport.endpoint import parse_endpoint, tcp_endpoint
from edgemesh.transport.zmq_link import ZmqTransport
from edgemesh.weights.blobs import BlobCache

log = logging.getLogger("edgemesh.worker")

CHUNK = 8 << 20


async def _with_launcher(key: NodeKey, spec: JobSpec, fn):  # type: ignore[no-untyped-def]
    transport = ZmqTransport(key)
    try:
        async with rpc_session(transport, spec.server, curve_public_for(spec.server_key),
                               bytes.fromhex(key.node_id)) as client:
            return await fn(client)
    finally:
        transport.close()


async def hello(key: NodeKey, spec: JobSpec, timeout: float = 20.0) -> None:
    """Reach the launcher's job server before loading anything: a launcher that cannot be reached
    (wrong address, firewall) shows in its own progress at once, and this worker exits."""
    async def run(client: RpcClient) -> None:
        await client.call("job.hello", {"job": spec.job, "rank": spec.rank}, timeout=timeout)

    await _with_launcher(key, spec, run)


async def fetch(key: NodeKey, spec: JobSpec, cache: BlobCache) -> dict[str, Path]:
    """Every slice of the job on local disk, verified; only the missing ones travel."""
    async def run(client: RpcClient) -> dict[str, Path]:
        paths: dict[str, Path] = {}
        for f in spec.files:
            if not cache.has(f.sha256, f.nbytes):
                t0 = time.perf_counter()
                w = cache.writer(f.sha256)
                try:
                    while w.written < f.nbytes:
                        n = min(CHUNK, f.nbytes - w.written)
                        _, tensors = await client.call(
                            "shard.get", {"job": spec.job, "rank": spec.rank, "sha256": f.sha256,
                                          "offset": w.written, "length": n}, timeout=60)
                        if len(tensors) != 1 or tensors[0][0].nbytes != n:
                            raise EdgemeshError("the launcher sent a chunk of the wrong size")
                        w.write(tensors[0][1])
                    w.commit()
                except BaseException:
                    w.abort()
                    raise
                log.info("fetched %s (%.1f MB) in %.2f s", f.block, f.nbytes / 1e6, time.perf_counter() - t0)
            paths[f.block] = cache.path(f.sha256)
        return paths

    return await _with_launcher(key, spec, run)


async def report_ready(key: NodeKey, spec: JobSpec, endpoint: str) -> list[tuple[int, str]]:
    async def run(client: RpcClient) -> list[tuple[int, str]]:
        body, _ = await client.call("job.ready", {"job": spec.job, "rank": spec.rank, "endpoint": endpoint},
                                    timeout=600)
        return [(int(r), str(e)) for r, e in body["peers"]]

    return await _with_launcher(key, spec, run)


async def report_failure(key: NodeKey, spec: JobSpec, message: str) -> None:
    async def run(client: RpcClient) -> None:
        await client.call("job.failed", {"job": spec.job, "rank": spec.rank, "message": message[:1900]}, timeout=5)

    with contextlib.suppress(EdgemeshError):
        await _with_launcher(key, spec, run)


def run_job(state: StateDir, spec: JobSpec, host: str, advertise: str | None = None) -> int:
    key, _ = state.load_identity()
    try:
        asyncio.run(hello(key, spec))
    except EdgemeshError as exc:
        log.error("cannot reach the launcher's job server at %s: %s", spec.server, exc)
        return 2
    import torch

    from edgemesh.collective.members import CurveKeys, Peer
    from edgemesh.collective.costmodel import LinkCost
    from edgemesh.collective.group import CollectiveGroup, CollectiveOptions
    from edgemesh.collective.tcp_links import SecureLinks, max_message_for
    from edgemesh.llm.follow import follow_master
    from edgemesh.llm.model import Participant
    from edgemesh.weights.config import ModelConfig
    from edgemesh.weights.provider import InMemoryProvider
    from edgemesh.weights.shard import ShardSpec, vocab_range

    if spec.threads:
        torch.set_num_threads(spec.threads)
    pin_to_slot(spec.cpu_slot)
    provider = None
    try:
        config = ModelConfig.from_json(spec.config)
        specs = [ShardSpec.from_json(s) for s in spec.specs]
        paths = asyncio.run(fetch(key, spec, BlobCache(state.path / "blobs")))
        if spec.window:  # stream the slices from disk through a window (--memory-budget)
            from edgemesh.weights.window import WindowedProvider, execution_order

            provider = WindowedProvider(paths, execution_order(config, spec.rank, "output" in paths), spec.window, name=f"rank{spec.rank}")
        else:
            provider = InMemoryProvider.from_files(paths)
        # The largest message is the prefill's hidden state (fp32): a record header may announce no more.
        links = SecureLinks.bind(tcp_endpoint(host, 0), CurveKeys(key.curve_public, key.curve_secret),
                                 [curve_public_for(k) for k in spec.keys],
                                 max_message=max_message_for(config.hidden_size * spec.max_seq_len * 4),
                                 job=spec.job)
        # Bound on the daemon's listen address (0.0.0.0 by default): tell the others where to dial.
        endpoint = tcp_endpoint(advertise or host, parse_endpoint(links.endpoint)[1]) \
            if is_wildcard(host) else links.endpoint
    except Exception as exc:  # noqa: BLE001 — tell the launcher why, then give up
        log.error("could not prepare: %s", exc)
        _close(provider)
        asyncio.run(report_failure(key, spec, str(exc)))
        return 2
    try:
        peers = asyncio.run(report_ready(key, spec, endpoint))
        group = CollectiveGroup(
            links, spec.rank, spec.world,
            [Peer(r, e, curve_public_for(spec.keys[r])) for r, e in peers if r != spec.rank],
            CollectiveOptions(timeout=spec.timeout, algorithm=spec.algorithm, compression=spec.compression,
                              shared_memory=spec.shared_memory,
                              **({} if spec.link_cost is None else {"cost": LinkCost(*spec.link_cost)})))
    except EdgemeshError as exc:
        links.close(abandon=True)
        _close(provider)
        log.error("could not join the group: %s", exc)
        asyncio.run(report_failure(key, spec, f"could not join the group: {str(exc).removeprefix(f'rank {spec.rank}: ')}"))
        return 2
    model = Participant(config, specs, provider, group, max_seq_len=spec.max_seq_len,
                        vocab=vocab_range(config, specs, spec.rank, spec.world))
    log.info("rank %d/%d of job %s ready (%.1f MB of weights%s)", spec.rank, spec.world, spec.job,
             provider.nbytes() / 1e6, f" resident, streamed through a {spec.window}-block window" if spec.window else "")
    try:
        with torch.inference_mode():
            follow_master(model)
        log.info("stopped by the master")
        return 0
    except EdgemeshError as exc:
        log.error("leaving the group: %s", exc)
        return 1
    finally:
        group.close()
        _close(provider)


def _close(provider: object) -> None:
    """Stop a windowed provider's loader thread (the in-memory one has nothing to stop)."""
    close = getattr(provider, "close", None)
    if close is not None:
        close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="edgemesh-worker")
    p.add_argument("--state-dir", required=True, type=Path)
    p.add_argument("--job", required=True, type=Path)
    p.add_argument("--host", required=True, help="address the collective socket binds")
    p.add_argument("--advertise", help="address the other ranks dial (when --host is a wildcard)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = JobSpec.from_wire(msgpack.unpackb(args.job.read_bytes(), raw=False, strict_map_key=True))
    sys.exit(run_job(StateDir(args.state_dir), spec, args.host, args.advertise))


if __name__ == "__main__":
    main()
