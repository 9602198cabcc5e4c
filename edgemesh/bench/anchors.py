"""`edgemesh bench anchors`: edgemesh beside distributed-llama and llama.cpp, one machine, one run.

Absolute decode speeds differ several-fold between machines (and between days on a rented one),
so a comparison only holds when every system runs on the same host within minutes of each other.
This module drives each system as its own processes on 127.0.0.1 and reads back one figure per
configuration, the median decode step in ms/token:

- edgemesh: ``edgemesh bench generate MODEL --nodes N --json -`` against a local cluster that this
  run starts and stops (``edgemesh cluster up``), one row per store model (fp32, int8, …); the
  one-device figure is the one ``bench generate`` measures in the same run.
- distributed-llama: ``dllama worker`` × (N−1) plus ``dllama inference`` (its per-token "Pred … Sync"
  lines), 1 node with ``threads`` threads and N nodes with 1 thread each, ``--net-turbo 0``
  (its busy-polling stalls when processes outnumber cores).
- llama.cpp: ``llama-bench -p 0 -n TOKENS -t threads -o json`` (one device; it has no
  tensor-parallel CPU mode).

The external binaries are optional: a system whose paths are not given is left out of the table.
Only processes this module starts are stopped, by their handles.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgemesh.config import edgemesh_home
from edgemesh.errors import ConfigError, EdgemeshError

_PRED = re.compile(r"Pred\s+(\d+) ms Sync\s+(\d+) ms \| Sent\s+(\d+) kB Recv\s+(\d+) kB")


class AnchorError(EdgemeshError):
    """An anchor system could not be run (missing binary, bad output)."""


@dataclass
class AnchorOptions:
    nodes: int = 3
    tokens: int = 48
    reps: int = 3
    threads: int = 2  # one device: threads of the single process (distributed-llama, llama.cpp)
    models: list[str] = field(default_factory=lambda: ["smollm2-135m-instruct", "smollm2-135m-instruct-int8"])
    wires: list[str] = field(default_factory=lambda: ["float32"])  # edgemesh --wire-dtype per run
    store: Path | None = None  # edgemesh model store holding ``models``
    dllama: Path | None = None
    dllama_model: Path | None = None
    dllama_tokenizer: Path | None = None
    llama_bench: Path | None = None
    gguf: Path | None = None
    port0: int = 19990

    def check(self) -> None:
        if self.nodes < 2 or self.tokens < 4 or self.reps < 1 or self.threads < 1:
            raise ConfigError("--nodes ≥ 2, --tokens ≥ 4, --reps ≥ 1 and --threads ≥ 1 please")
        bad = [w for w in self.wires if w not in ("float32", "float16", "bfloat16", "q8_0")]
        if bad or not self.wires:
            raise ConfigError(f"--wire-dtype must be float32, float16, bfloat16 or q8_0 (got {bad or 'none'})")
        dl = [self.dllama, self.dllama_model, self.dllama_tokenizer]
        if any(dl) and not all(dl):
            raise ConfigError("distributed-llama needs --dllama, --dllama-model and --dllama-tokenizer together")
        if bool(self.llama_bench) != bool(self.gguf):
            raise ConfigError("llama.cpp needs --llama-bench and --gguf together")
        for p in [*dl, self.llama_bench, self.gguf]:
            if p is not None and not Path(p).exists():
                raise ConfigError(f"{p}: no such file")


def _median(xs: list[float]) -> float:
    return round(statistics.median(xs), 2)


def run_dllama(opts: AnchorOptions, nodes: int, threads: int, log_dir: Path) -> dict[str, Any]:
    """One distributed-llama generation on ``nodes`` local processes; its median token time."""
    assert opts.dllama and opts.dllama_model and opts.dllama_tokenizer
    workers: list[subprocess.Popen[bytes]] = []
    addrs = []
    try:
        for i in range(nodes - 1):
            port = opts.port0 + i
            log = open(log_dir / f"dllama-n{nodes}-worker{i + 1}.log", "wb")
            workers.append(subprocess.Popen(
                [str(opts.dllama), "worker", "--host", "127.0.0.1", "--port", str(port), "--nthreads", str(threads),
                 "--net-turbo", "0"], stdout=log, stderr=subprocess.STDOUT))
            log.close()
            addrs.append(f"127.0.0.1:{port}")
        time.sleep(0.5 if workers else 0)  # the workers listen before the root dials them
        cmd = [str(opts.dllama), "inference", "--model", str(opts.dllama_model), "--tokenizer",
               str(opts.dllama_tokenizer), "--buffer-float-type", "q80", "--prompt", "The capital of France is",
               "--steps", str(opts.tokens), "--nthreads", str(threads), "--temperature", "0", "--max-seq-len", "512",
               "--net-turbo", "0"] + (["--workers", *addrs] if addrs else [])
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    finally:
        for p in workers:
            p.terminate()
        for p in workers:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    (log_dir / f"dllama-n{nodes}-root.log").write_text(r.stdout + r.stderr)
    steps = [tuple(map(int, m)) for m in _PRED.findall(r.stdout)]
    if r.returncode != 0 or not steps:
        raise AnchorError(f"distributed-llama on {nodes} node(s) failed (exit {r.returncode}): "
                          f"{(r.stdout + r.stderr).strip().splitlines()[-1:] or ['no output']}")
    return {"ms_per_token": _median([p + s for p, s, _, _ in steps]),
            "sync_ms_per_token": _median([s for _, s, _, _ in steps]),
            "bytes_per_token": int(1024 * statistics.median([a + b for _, _, a, b in steps]))}


def run_llama_bench(opts: AnchorOptions) -> dict[str, Any]:
    """llama.cpp's own benchmark of decode (``-p 0 -n TOKENS``) on one device."""
    assert opts.llama_bench and opts.gguf
    r = subprocess.run([str(opts.llama_bench), "-m", str(opts.gguf), "-p", "0", "-n", str(opts.tokens),
                        "-t", str(opts.threads), "-r", "1", "-o", "json"], capture_output=True, text=True, timeout=600)
    try:
        rows = json.loads(r.stdout)
        ts = float(rows[0]["avg_ts"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise AnchorError(f"llama-bench failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-300:]}") from None
    return {"ms_per_token": round(1e3 / ts, 2)}


def _em(args: list[str], env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgemesh.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def run_edgemesh(opts: AnchorOptions, model: str, env: dict[str, str], wire: str = "float32") -> dict[str, Any]:
    args = ["bench", "generate", model, "--nodes", str(opts.nodes), "--tokens", str(opts.tokens), "--json", "-"]
    if wire != "float32":
        args += ["--wire-dtype", wire]
    if opts.store:
        args += ["--store", str(opts.store)]
    r = _em(args, env)
    try:
        out = json.loads(r.stdout)
    except ValueError:
        raise AnchorError(f"edgemesh bench generate {model} failed (exit {r.returncode}): "
                          f"{r.stderr.strip().splitlines()[-1:] or ['no output']}") from None
    keep = ("ms_per_token", "single_ms_per_token", "bound_ms_per_token", "bytes_per_token", "prefill_ms",
            "single_prefill_ms", "ms_per_token_by_rank", "master_in_collectives_ms_per_token", "star_allreduce_us")
    return {k: out[k] for k in keep if k in out}


def bench(opts: AnchorOptions, progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Every configured system, ``reps`` rounds interleaved (so a slow minute hits all of them)."""
    opts.check()
    rows: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="edgemesh-anchors-") as tmp:
        home = Path(tmp)
        env = dict(os.environ, EDGEMESH_HOME=str(home))
        if opts.store is None:  # the caller's store, not one inside the temporary home
            opts.store = edgemesh_home() / "models"
        progress(f"starting a local cluster of {opts.nodes} daemons")
        up = _em(["cluster", "up", "--nodes", str(opts.nodes)], env, timeout=120)
        if up.returncode != 0:
            raise AnchorError(f"could not start the local cluster: {up.stderr.strip()[-300:]}")
        try:
            # The daemons measure their device (the start-up series loads the CPU) and links,
            # which the planner uses: the first round starts once that is done.
            progress("waiting for the daemons' start-up measurements")
            _wait_profiled(env, opts.nodes)
            for rep in range(opts.reps):
                for model in opts.models:
                    for wire in opts.wires:
                        label = model if wire == "float32" else f"{model} ({wire} wire)"
                        progress(f"round {rep + 1}/{opts.reps}: edgemesh {label} on 1 and {opts.nodes} members")
                        rows.setdefault(f"edgemesh:{label}", []).append(run_edgemesh(opts, model, env, wire))
                if opts.dllama:
                    progress(f"round {rep + 1}/{opts.reps}: distributed-llama on 1 and {opts.nodes} nodes")
                    rows.setdefault("dllama:1", []).append(run_dllama(opts, 1, opts.threads, home))
                    rows.setdefault(f"dllama:{opts.nodes}", []).append(run_dllama(opts, opts.nodes, 1, home))
                if opts.llama_bench:
                    progress(f"round {rep + 1}/{opts.reps}: llama.cpp on 1 device")
                    rows.setdefault("llama.cpp:1", []).append(run_llama_bench(opts))
        finally:
            _em(["cluster", "down"], env, timeout=60)
    return summarize(rows, opts)


def _wait_profiled(env: dict[str, str], nodes: int, timeout: float = 180.0) -> None:
    """Until every member has published ``STARTUP_MEASUREMENTS`` profiles (at most ``timeout``
    seconds; then the rounds start anyway), and a moment for the links' probes."""
    from edgemesh.runtime.services.profile import STARTUP_MEASUREMENTS

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = _em(["status", "--json", "-"], env, timeout=60)
        try:
            members = json.loads(res.stdout)["members"]
            done = [int((m.get("profile") or {}).get("measurements") or 0) for m in members]
        except (ValueError, KeyError, TypeError):
            done = []
        if len(done) >= nodes and min(done) >= STARTUP_MEASUREMENTS:
            break
        time.sleep(2)
    time.sleep(2)


def summarize(rows: dict[str, list[dict[str, Any]]], opts: AnchorOptions) -> dict[str, Any]:
    """Medians over rounds, and each figure's ratio to distributed-llama's of the same run."""
    out: dict[str, Any] = {"nodes": opts.nodes, "tokens": opts.tokens, "reps": opts.reps, "threads": opts.threads,
                           "loadavg": round(os.getloadavg()[0], 2), "runs": rows, "systems": {}}
    for key, runs in rows.items():
        med = {k: _median([r[k] for r in runs if isinstance(r.get(k), (int, float))])
               for k in runs[0] if isinstance(runs[0][k], (int, float))}
        out["systems"][key] = med
    dl1 = out["systems"].get("dllama:1", {}).get("ms_per_token")
    dln = out["systems"].get(f"dllama:{opts.nodes}", {}).get("ms_per_token")
    for key, med in out["systems"].items():
        if key.startswith("edgemesh:"):
            if dl1 and "single_ms_per_token" in med:
                med["single_vs_dllama_1"] = round(med["single_ms_per_token"] / dl1, 2)
            if dln and "ms_per_token" in med:
                med[f"nodes_vs_dllama_{opts.nodes}"] = round(med["ms_per_token"] / dln, 2)
    return out
