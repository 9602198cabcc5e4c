"""CLI: `edgemesh launch MODEL` (OpenAI-compatible server) and `edgemesh generate MODEL PROMPT`."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from edgemesh.cli import app
from edgemesh.cli.model import default_store_dir
from edgemesh.cli.node import resolve_state
from edgemesh.errors import ConfigError

err = Console(stderr=True)

NodesOpt = typer.Option(None, "--nodes", "-n", help="How many members to use, this one included (default: every alive member).")
OnOpt = typer.Option(None, "--on", help="Comma-separated member names to use (this node is always the master).")
StateOpt = typer.Option(None, "--state-dir", help="The launching node's state dir (default: this device's node, else the local cluster).")
StoreOpt = typer.Option(None, "--store", help="Model store (default $EDGEMESH_HOME/models).")
CtxOpt = typer.Option(2048, "--max-seq-len", help="Context length to plan and allocate for.")
TimeoutOpt = typer.Option(5.0, "--collective-timeout", help="Seconds a device may stall before it counts as failed.")
AlgoOpt = typer.Option("auto", "--allreduce", help="auto (cost model) | star | chunked_star | ring.")
CompressOpt = typer.Option(None, "--wire-dtype", help="Send partial sums as float16 or bfloat16 (default: exact fp32).")


def _options(nodes: Optional[int], on: Optional[str], max_seq_len: int, timeout: float, algo: str,
             compression: Optional[str]):  # type: ignore[no-untyped-def]
    from edgemesh.runtime.launch import LaunchOptions

    if algo not in ("auto", "star", "chunked_star", "ring"):
        raise ConfigError(f"--allreduce must be auto, star, chunked_star or ring (got {algo!r})")
    if compression not in (None, "float16", "bfloat16"):
        raise ConfigError(f"--wire-dtype must be float16 or bfloat16 (got {compression!r})")
    names = tuple(n.strip() for n in on.split(",") if n.strip()) if on else ()
    return LaunchOptions(nodes=nodes, names=names, max_seq_len=max_seq_len, timeout=timeout,
                         algorithm=algo, compression=compression)


def _plan_table(deployment) -> Table:  # type: ignore[no-untyped-def]
    t = Table(title=f"{deployment.entry.name} over {deployment.plan.world_size} device(s)")
    for col in ("rank", "node", "KV groups", "MLP rows", "weights MB", "predicted mem MB"):
        t.add_column(col)
    for d, m in zip(deployment.plan.devices, deployment.members):
        t.add_row(str(d.rank), m["name"], str(d.kv_groups), str(d.mlp_rows), f"{d.weight_bytes / 1e6:.0f}",
                  f"{d.mem_bytes / 1e6:.0f}")
    return t


async def _deploy(state_dir, model, store, opts):  # type: ignore[no-untyped-def]
    from edgemesh.runtime.launch import Deployment
    from edgemesh.weights.store import ModelStore

    entry = ModelStore(store or default_store_dir()).get(model)
    state = resolve_state(state_dir)
    status = err.status("starting…")
    status.start()
    deployment = Deployment(state, entry, opts, progress=lambda msg: status.update(msg))
    try:
        await deployment.open()
        await deployment.deploy()
    except BaseException:
        status.stop()
        await deployment.close()
        raise
    status.stop()
    deployment.progress = lambda msg: err.print(msg)
    err.print(_plan_table(deployment))
    return deployment


def _engine(deployment):  # type: ignore[no-untyped-def]
    from edgemesh.llm.tokenizer import ChatTokenizer
    from edgemesh.runtime.engine import Engine
    from edgemesh.runtime.launch import is_cluster_failure, keepalive

    tokenizer = ChatTokenizer.from_entry(deployment.entry)
    return Engine(deployment.entry.name, deployment.model, tokenizer, recover=deployment.recover,
                  is_cluster_failure=is_cluster_failure, on_idle=keepalive)


@app.command()
def launch(
    model: str = typer.Argument(..., help="A model in the store (`edgemesh model list`)."),
    nodes: Optional[int] = NodesOpt, on: Optional[str] = OnOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address the HTTP API listens on."),
    port: int = typer.Option(8000, "--port", help="Port of the HTTP API."),
    state_dir: Optional[Path] = StateOpt, store: Optional[Path] = StoreOpt, max_seq_len: int = CtxOpt,
    timeout: float = TimeoutOpt, algo: str = AlgoOpt, compression: Optional[str] = CompressOpt,
) -> None:
    """Split MODEL over the cluster and serve it with an OpenAI-compatible API until Ctrl-C."""
    from edgemesh.runtime.api import ApiServer, serve

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    opts = _options(nodes, on, max_seq_len, timeout, algo, compression)

    async def main() -> None:
        deployment = await _deploy(state_dir, model, store, opts)
        engine = _engine(deployment)
        ready = asyncio.Event()
        server = asyncio.ensure_future(serve(ApiServer(engine, deployment.entry.name), host, port, ready))
        try:
            await asyncio.wait([server, asyncio.ensure_future(ready.wait())], return_when=asyncio.FIRST_COMPLETED)
            if server.done():
                server.result()
            err.print(f"serving [bold]{deployment.entry.name}[/] at http://{host}:{port}/v1 — Ctrl-C to stop")
            await server
        finally:
            server.cancel()
            await asyncio.to_thread(engine.close)
            await deployment.close()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        err.print("stopped")


@app.command()
def generate(
    model: str = typer.Argument(..., help="A model in the store."),
    prompt: str = typer.Argument(..., help="The prompt (a user message, or raw text with --raw)."),
    nodes: Optional[int] = NodesOpt, on: Optional[str] = OnOpt,
    max_tokens: int = typer.Option(128, "--max-tokens", help="How many tokens at most."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    raw: bool = typer.Option(False, "--raw", help="Complete the text as is (no chat template)."),
    state_dir: Optional[Path] = StateOpt, store: Optional[Path] = StoreOpt, max_seq_len: int = CtxOpt,
    timeout: float = TimeoutOpt, algo: str = AlgoOpt, compression: Optional[str] = CompressOpt,
) -> None:
    """Generate a reply in the terminal, split over the cluster, and report the speed."""
    from edgemesh.llm.sampling import SamplingParams
    from edgemesh.runtime.engine import GenEvent, GenRequest

    opts = _options(nodes, on, max_seq_len, timeout, algo, compression)
    params = SamplingParams(temperature=temperature, seed=seed)

    async def main() -> None:
        deployment = await _deploy(state_dir, model, store, opts)
        engine = _engine(deployment)
        try:
            tok = engine.tokenizer
            ids = tok.encode(prompt, add_special_tokens=True) if raw else tok.encode_chat([{"role": "user", "content": prompt}])
            if len(ids) + max_tokens > engine.context_length:
                raise ConfigError(f"prompt ({len(ids)} tokens) + --max-tokens ({max_tokens}) exceeds the context "
                                  f"of {engine.context_length}; use --max-seq-len")
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[GenEvent] = asyncio.Queue()
            engine.submit(GenRequest(ids, max_tokens, params), lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
            while True:
                ev = await events.get()
                if ev.error is not None:
                    raise ev.error
                sys.stdout.write(ev.text)
                sys.stdout.flush()
                if ev.done:
                    break
            print()
            ttft = f"{ev.ttft_s * 1000:.0f} ms" if ev.ttft_s is not None else "-"
            per = f"{ev.decode_s * 1000:.1f} ms/token" if ev.decode_s is not None else "-"
            err.print(f"{ev.completion_tokens} tokens; first token {ttft}; decode {per}")
        finally:
            await asyncio.to_thread(engine.close)
            await deployment.close()

    asyncio.run(main())
