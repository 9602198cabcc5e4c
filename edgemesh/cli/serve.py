"""CLI: `edgemesh launch MODEL` (OpenAI-compatible server) and `edgemesh generate MODEL PROMPT`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from edgemesh.cli import app
from edgemesh.cli.model import default_store_dir, print_notes
from edgemesh.cli.node import resolve_state
from edgemesh.cli.output import json_option, to_stdout, write_json
from edgemesh.cli.progress import PhaseProgress
from edgemesh.errors import ConfigError

err = Console(stderr=True)

NodesOpt = typer.Option(None, "--nodes", "-n", help="How many members to use, this one included (default: every alive member).")
OnOpt = typer.Option(None, "--on", help="Comma-separated member names to use (this node is always the master).")
StateOpt = typer.Option(None, "--state-dir", help="The launching node's state dir (default: this device's node, else the local cluster).")
StoreOpt = typer.Option(None, "--store", help="Model store (default $EDGEMESH_HOME/models).")
CtxOpt = typer.Option(2048, "--max-seq-len", help="Context length to plan and allocate for.")
TimeoutOpt = typer.Option(5.0, "--collective-timeout", help="Seconds a device may stall before it counts as failed.")
AlgoOpt = typer.Option("auto", "--allreduce", help="auto (cost model) | star | chunked_star | ring | direct.")
CompressOpt = typer.Option(None, "--wire-dtype", help="Send partial sums as float16, bfloat16 or q8_0 (blocks of 32 int8 + one fp16 scale: 0.27 of the fp32 bytes, the precision of distributed-llama's q80; default: exact fp32).")
SpecOpt = typer.Option("lookup", "--speculate",
                       help="Propose tokens and check several per step through the group: lookup (n-grams of the "
                            "prompt and text so far; switches itself off per request when it does not pay), "
                            "draft:MODEL (a small model with the same tokenizer, on this node), or off. "
                            "Greedy output is the same as plain decoding; sampling keeps its distribution.")
BudgetOpt = typer.Option(None, "--memory-budget", help="Memory per device, e.g. 2GiB or 384MiB: weights stream from "
                                                       "disk through a small window when they do not fit.")


def _options(nodes: Optional[int], on: Optional[str], max_seq_len: int, timeout: float, algo: str,
             compression: Optional[str], memory_budget: Optional[str] = None):  # type: ignore[no-untyped-def]
    from edgemesh.config import LaunchOptions
    from edgemesh.placement.memory import parse_size

    if algo not in ("auto", "star", "chunked_star", "ring", "direct"):
        raise ConfigError(f"--allreduce must be auto, star, chunked_star, ring or direct (got {algo!r})")
    if compression not in (None, "float16", "bfloat16", "q8_0"):
        raise ConfigError(f"--wire-dtype must be float16, bfloat16 or q8_0 (got {compression!r})")
    names = tuple(n.strip() for n in on.split(",") if n.strip()) if on else ()
    return LaunchOptions(nodes=nodes, names=names, max_seq_len=max_seq_len, timeout=timeout,
                         algorithm=algo, compression=compression,
                         memory_budget=parse_size(memory_budget) if memory_budget else None)


def _plan_table(deployment) -> Table:  # type: ignore[no-untyped-def]
    t = Table(title=f"{deployment.entry.name} over {deployment.plan.world_size} device(s)")
    for col in ("rank", "node", "KV groups", "MLP rows", "weights MB", "predicted mem MB"):
        t.add_column(col)
    for d, m in zip(deployment.plan.devices, deployment.members):
        t.add_row(str(d.rank), m["name"], str(d.kv_groups), str(d.mlp_rows), f"{d.weight_bytes / 1e6:.0f}",
                  f"{d.mem_bytes / 1e6:.0f}")
    return t


async def _deploy(state_dir, model, store, opts):  # type: ignore[no-untyped-def]
    from edgemesh.runtime.deploy import Deployment
    from edgemesh.weights.store import ModelStore

    entry = ModelStore(store or default_store_dir()).get(model)
    if not entry.has("tokenizer.json"):
        # Fail before shipping weights around the cluster, not after.
        raise ConfigError(f"model {entry.name!r} has no tokenizer, so it cannot be served; synthesize it with "
                          "`--tokenizer MODEL` or benchmark it with `edgemesh bench generate`")
    state = resolve_state(state_dir)
    status = PhaseProgress(err, "starting…").__enter__()
    deployment = Deployment(state, entry, opts, progress=status)
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
    if deployment.plan.window:
        err.print(f"weights stream from disk through a {deployment.plan.window}-block window per device "
                  f"(--memory-budget {deployment.plan.memory_budget / (1 << 20):.0f} MiB)")
    print_notes(err, deployment.left_out)
    return deployment


def _engine(deployment, resume: bool = True, proposer=None):  # type: ignore[no-untyped-def]
    from edgemesh.llm.tokenizer import ChatTokenizer
    from edgemesh.runtime.engine import Engine
    from edgemesh.runtime.deploy import is_cluster_failure, keepalive

    tokenizer = ChatTokenizer.from_entry(deployment.entry)
    return Engine(deployment.entry.name, deployment.model, tokenizer, recover=deployment.recover,
                  is_cluster_failure=is_cluster_failure, on_idle=keepalive, resume=resume,
                  prepare_thread=deployment.prepare_compute_thread, proposer=proposer,
                  spec_k_max=spec_k_max(deployment.entry))


def spec_k_max(entry) -> int:  # type: ignore[no-untyped-def]
    from edgemesh.runtime.speculation import k_max_for

    return k_max_for(entry)


def _proposer(speculate: str, store, deployment):  # type: ignore[no-untyped-def]
    from edgemesh.runtime.speculation import proposer_factory

    return proposer_factory(speculate, store or default_store_dir(), deployment.entry, deployment.options.max_seq_len)


@app.command()
def launch(
    model: str = typer.Argument(..., help="A model in the store (`edgemesh model list`)."),
    nodes: Optional[int] = NodesOpt, on: Optional[str] = OnOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address the HTTP API listens on."),
    port: int = typer.Option(8000, "--port", help="Port of the HTTP API."),
    state_dir: Optional[Path] = StateOpt, store: Optional[Path] = StoreOpt, max_seq_len: int = CtxOpt,
    timeout: float = TimeoutOpt, algo: str = AlgoOpt, compression: Optional[str] = CompressOpt,
    memory_budget: Optional[str] = BudgetOpt,
    resume: bool = typer.Option(True, "--resume/--no-resume",
                                help="When a device fails mid-request, re-plan over the others and finish the "
                                     "request (default), or fail it with HTTP 503 at once."),
    speculate: str = SpecOpt,
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="EDGEMESH_API_KEY", show_envvar=True,
        help="Clients must send 'Authorization: Bearer KEY'. Required when --host is not a loopback address. "
             "Prefer the environment variable: a flag is visible to other users in the process list."),
    max_pending: int = typer.Option(16, "--max-pending", help="Requests queued or running at once; more get HTTP 429."),
    max_body: int = typer.Option(1 << 20, "--max-body", help="Largest request body in bytes; larger get HTTP 413."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens",
                                             help="Largest max_tokens a request may ask for (default: the context)."),
) -> None:
    """Split MODEL over the cluster and serve it with an OpenAI-compatible API until Ctrl-C.

    MODEL may also be vit:SPLIT, a ViT split made by `edgemesh vit split`: its sub-models are
    placed on the members (any path, NATs included) and POST /v1/classify classifies images."""
    from edgemesh.runtime.api import ApiLimits, ApiServer, check_exposure

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    limits = ApiLimits(api_key=api_key, max_pending=max_pending, max_body=max_body, max_tokens=max_tokens)
    check_exposure(host, limits.api_key)  # before any weights move
    if model.startswith("vit:"):
        _launch_vit(model[len("vit:"):], nodes, on, state_dir, host, port, limits)
        return
    opts = _options(nodes, on, max_seq_len, timeout, algo, compression, memory_budget)

    async def main() -> None:
        async with _serving(state_dir, model, store, opts, resume, speculate) as (deployment, engine):
            async def swarm(question: str) -> dict:  # type: ignore[type-arg]
                from edgemesh.runtime.control import control_call

                return await control_call(deployment.state, "admin.swarm_ask", {"question": question, "timeout": 120.0},
                                          timeout=400.0)

            await _serve_api(ApiServer(engine, deployment.entry.name, limits, swarm=swarm), host, port,
                             f"serving [bold]{deployment.entry.name}[/] at http://{host}:{port}/v1 — Ctrl-C to stop")

    _run_until_stopped(main, "stopped; the workers were released")


def _run_until_stopped(main, note: str) -> None:  # type: ignore[no-untyped-def]
    """Run the server coroutine until Ctrl-C / SIGTERM (every `finally` runs), then say so."""
    try:
        asyncio.run(main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    err.print(note)


async def _serve_api(api, host: str, port: int, banner: str) -> None:  # type: ignore[no-untyped-def]
    """Serve ``api`` until cancelled; the banner once it listens (a port in use fails at once)."""
    from edgemesh.runtime.api import serve

    ready = asyncio.Event()
    server = asyncio.ensure_future(serve(api, host, port, ready))
    try:
        await asyncio.wait([server, asyncio.ensure_future(ready.wait())], return_when=asyncio.FIRST_COMPLETED)
        if server.done():
            server.result()
        err.print(banner)
        await server
    finally:
        server.cancel()


def _launch_vit(split: str, nodes: Optional[int], on: Optional[str], state_dir: Optional[Path], host: str, port: int,  # type: ignore[no-untyped-def]
                limits) -> None:
    from edgemesh.runtime.api import ApiServer
    from edgemesh.runtime.vit_deploy import VitDeployment
    from edgemesh.vit.store import resolve

    directory = resolve(split, None, "split")
    state = resolve_state(state_dir)

    async def main() -> None:
        _stop_on_signals()
        with PhaseProgress(err, "loading the split") as progress:
            names = tuple(n.strip() for n in on.split(",") if n.strip()) if on else ()
            deployment = VitDeployment(state, directory, progress=progress, nodes=nodes, names=names)
            await deployment.deploy()
        t = Table(title=f"{directory.name}: {len(deployment.slots)} sub-models")
        for col in ("part", "member", "classes"):
            t.add_column(col)
        for slot, part in zip(deployment.slots, deployment.split.parts):
            t.add_row(slot.name, slot.node_name, ", ".join(deployment.labels[c] if c < len(deployment.labels) else str(c)
                                                          for c in part.classes))
        err.print(t)
        await _serve_api(ApiServer(None, f"vit:{directory.name}", limits, classifier=deployment), host, port,
                         f"classifying with [bold]{directory.name}[/] at http://{host}:{port}/v1/classify — Ctrl-C to stop")

    _run_until_stopped(main, "stopped")


@app.command()
def classify(
    images: list[Path] = typer.Argument(..., help="PNG or JPEG files."),
    url: str = typer.Option("http://127.0.0.1:8000/v1", "--url", help="Base URL of a `launch vit:SPLIT` server."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="EDGEMESH_API_KEY"),
    json_path: Optional[str] = json_option("the server's whole answer"),
) -> None:
    """Classify images with a ViT split served by `edgemesh launch vit:SPLIT`."""
    import json
    import urllib.error
    import urllib.request
    import uuid

    from edgemesh.errors import EdgemeshError

    boundary = uuid.uuid4().hex
    body = b""
    for path in images:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{path.name}\"\r\n"
                 "Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url.rstrip("/") + "/classify", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            answer = json.load(resp)
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        try:
            detail = json.loads(detail)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        raise EdgemeshError(f"the server refused the images ({exc.code}): {detail}") from None
    except OSError as exc:
        raise EdgemeshError(f"no classifier answers at {url} ({exc})") from None
    write_json(json_path, answer, note=err.print)
    if to_stdout(json_path):
        return
    for path, row in zip(images, answer["data"]):
        print(f"{path}\t{row['label']}\t{row['probability']:.3f}")
    if answer.get("missing_parts"):
        err.print(f"answered without parts {', '.join(answer['missing_parts'])} (their members did not reply)")


@contextlib.asynccontextmanager
async def _serving(state_dir, model, store, opts, resume: bool = True, speculate: str = "off"):  # type: ignore[no-untyped-def]
    """Deploy MODEL and start its engine; on every exit path stop the engine, then release the
    workers (also when building the engine fails)."""
    from edgemesh.runtime.speculation import MODES

    if speculate not in ("off", "lookup") and not speculate.startswith("draft:"):
        raise ConfigError(f"--speculate must be {MODES} (got {speculate!r})")  # before any weights travel
    _stop_on_signals()
    deployment = await _deploy(state_dir, model, store, opts)
    try:
        engine = _engine(deployment, resume, await asyncio.to_thread(_proposer, speculate, store, deployment))
        try:
            yield deployment, engine
        finally:
            await asyncio.to_thread(engine.close)
    finally:
        await deployment.close()


def _stop_on_signals() -> None:
    """SIGTERM and SIGINT cancel the main task, so every `finally` runs (workers are told to
    stop, sockets closed). Installed explicitly: a shell starts background jobs with SIGINT
    ignored, and Python's default SIGTERM would skip all cleanup."""
    import signal

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)


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
    speculate: str = SpecOpt,
    memory_budget: Optional[str] = BudgetOpt,
) -> None:
    """Generate a reply in the terminal, split over the cluster, and report the speed."""
    from edgemesh.llm.sampling import SamplingParams
    from edgemesh.runtime.engine import GenEvent, GenRequest

    opts = _options(nodes, on, max_seq_len, timeout, algo, compression, memory_budget)
    params = SamplingParams(temperature=temperature, seed=seed)

    async def main() -> None:
        async with _serving(state_dir, model, store, opts, speculate=speculate) as (deployment, engine):
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
            spec = ev.speculative
            note = "" if not spec or not spec["proposed"] else \
                f"; speculative: {spec['accepted']}/{spec['proposed']} proposed tokens accepted in {spec['steps']} steps"
            err.print(f"{ev.completion_tokens} tokens; first token {ttft}; decode {per}{note}")

    try:
        asyncio.run(main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        err.print("interrupted")
        raise typer.Exit(130) from None


@app.command()
def ask(
    question: str = typer.Argument(..., help="What to ask."),
    url: str = typer.Option("http://127.0.0.1:8000/v1", "--url", help="Base URL of an OpenAI-compatible API."),
    model: Optional[str] = typer.Option(None, "--model", help="Model id (default: the server's first model)."),
    max_tokens: int = typer.Option(128, "--max-tokens"),
    wait: float = typer.Option(0.0, "--wait", help="Seconds to wait for the server to come up."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="EDGEMESH_API_KEY", show_envvar=True,
                                          help="The server's API key, if it has one."),
) -> None:
    """Ask a running server one chat question; stream the answer and report the latency."""
    import json
    import urllib.error
    import urllib.request

    from edgemesh.errors import EdgemeshError

    base = url.rstrip("/")
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + wait
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(base + "/models", headers=auth), timeout=5) as r:
                models = [m["id"] for m in json.load(r)["data"]]
            break
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                raise EdgemeshError(f"the server at {base} needs an API key: pass --api-key KEY or set "
                                    "EDGEMESH_API_KEY") from None
            raise EdgemeshError(f"the server at {base} answered {exc.code} to /models") from None
        except (OSError, ValueError, KeyError) as exc:
            if time.monotonic() >= deadline:
                raise EdgemeshError(f"no OpenAI-compatible server answers at {base} ({exc})") from None
            time.sleep(0.5)
    model = model or models[0]
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}],
                       "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(base + "/chat/completions", data=body, headers={"Content-Type": "application/json", **auth})
    t0 = time.perf_counter()
    stamps: list[float] = []
    usage = None
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise EdgemeshError(f"the server failed: {chunk['error'].get('message')}")
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        stamps.append(time.perf_counter())
                        sys.stdout.write(piece)
                        sys.stdout.flush()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300]
        raise EdgemeshError(f"the server refused the question ({exc.code}): {detail}") from None
    print()
    if stamps:
        n = (usage or {}).get("completion_tokens") or len(stamps)
        per = (stamps[-1] - stamps[0]) * 1000 / max(n - 1, 1)
        err.print(f"{model}: {n} tokens; first token after {(stamps[0] - t0) * 1000:.0f} ms; "
                  f"{per:.1f} ms/token after that")
