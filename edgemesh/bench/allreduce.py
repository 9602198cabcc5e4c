"""Allreduce benchmark: star vs chunked star vs ring over our encrypted TCP links, the same over the
zmq CURVE links they replaced, star over unencrypted TCP, and gloo.

W participants run as separate processes on 127.0.0.1. All methods run in the *same*
processes, interleaved rep by rep, so they see the same machine load (this box is noisy and
has fewer cores than participants). One rep of a method = a barrier, then ``ops`` back-to-back
allreduces; each rank times its batch, the rep's figure is the slowest rank's time per op, and
the reported number is the median over reps.

The parent process only orchestrates: it hands each worker its keys and config on stdin, learns
the bound endpoints from stdout, tells everyone the peer list, and collects JSON results.
Workers are its children and are ended by pid on every exit path.

Run a worker by hand: ``python -m edgemesh.bench.allreduce --worker`` (reads JSON on stdin).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import IO, Any, Callable

from edgemesh.collective.costmodel import Algorithm, LinkCost, choose, fit_from_allreduces
from edgemesh.collective.errors import CollectiveError

# star / chunked_star / ring / star_bf16: tcp_links.SecureLinks (the default data plane: TLS 1.3,
# cipher suite by CPU); *_chacha: the same forced to ChaCha20-Poly1305; *_ocb: bench.ocb_links, the
# hand-written X25519 + AES-256-OCB3 links TLS replaced; *_zmq: bench.zmq_links.PeerLinks with CURVE
# (the data plane before that); star_plain: TCP, no crypto.
METHODS = ("star", "chunked_star", "ring", "star_bf16", "star_plain", "star_zmq", "chunked_star_zmq", "ring_zmq", "gloo")
EXTRA_METHODS = ("star_chacha", "ring_chacha", "chunked_star_chacha", "star_ocb", "ring_ocb", "chunked_star_ocb")
KINDS = ("zmq", "ocb", "chacha")  # method suffix → a link layer of its own
SECURE = ("star", "chunked_star", "ring")  # the columns the cost model is fitted to
DEFAULT_SIZES = (2 * 1024, 16 * 1024, 64 * 1024, 256 * 1024, 1024 * 1024)
QUICK_SIZES = (2 * 1024, 16 * 1024, 1024 * 1024)


@dataclass(frozen=True)
class BenchConfig:
    worlds: tuple[int, ...] = (2, 3, 4)
    sizes: tuple[int, ...] = DEFAULT_SIZES  # bytes of fp32 per rank
    reps: int = 7  # timed batches per (method, size): the median is reported
    ops: int = 8  # allreduces per batch
    warmup: int = 3  # untimed allreduces per method and size
    methods: tuple[str, ...] = METHODS
    startup_timeout: float = 60.0  # importing torch in W processes on 2 cores is slow

    @classmethod
    def quick(cls) -> BenchConfig:
        return cls(worlds=(2, 4), sizes=QUICK_SIZES, reps=5, ops=5, warmup=2)


@dataclass
class BenchRow:
    w: int
    bytes: int
    us: dict[str, float] = field(default_factory=dict)  # method → median µs per allreduce

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"w": self.w, "bytes": self.bytes}
        for m, v in self.us.items():
            out[f"{m}_us"] = round(v, 1)
        return out


# ------------------------------------------------------------------ parent side


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for gloo's rendezvous, which cannot take port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


WORKER_ARGV = [sys.executable, "-m", "edgemesh.bench.allreduce", "--worker"]


class Placement:
    """Where the participants run. This one: all on 127.0.0.1, as children of this process.

    Another placement (the CLI's testbed one) runs rank k inside device k's network namespace;
    it must give each rank an address the others can reach and a command line that still
    makes the worker a child of this process (so it is ended by pid on every path).
    """

    max_world = 16

    def host(self, rank: int) -> str:
        return "127.0.0.1"

    def argv(self, rank: int, argv: list[str]) -> list[str]:
        return argv

    def env(self, rank: int) -> dict[str, str]:
        return dict(os.environ)

    def gloo_port(self) -> int:
        return free_port()


def run_benchmark(cfg: BenchConfig, progress: Callable[[str], None] | None = None,
                  placement: Placement | None = None) -> list[BenchRow]:
    rows: list[BenchRow] = []
    placement = placement or Placement()
    for w in cfg.worlds:
        if w > placement.max_world:
            raise CollectiveError(f"W={w} needs {w} places, this placement has {placement.max_world}")
        rows.extend(_run_world(w, cfg, progress or (lambda _msg: None), placement))
    return rows


def _run_world(w: int, cfg: BenchConfig, progress: Callable[[str], None], placement: Placement) -> list[BenchRow]:
    from edgemesh.collective.members import CurveKeys  # keys only; the parent opens no sockets

    keys = [CurveKeys.generate() for _ in range(w)]
    publics = [k.public.decode() for k in keys]
    gloo_port = placement.gloo_port()
    procs: list[subprocess.Popen[str]] = []
    logs: list[IO[str]] = []
    try:
        for rank in range(w):
            log = tempfile.TemporaryFile(mode="w+")
            logs.append(log)
            env = dict(placement.env(rank), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
            procs.append(subprocess.Popen(placement.argv(rank, WORKER_ARGV), stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=log, text=True, env=env))
        for rank, p in enumerate(procs):
            _write(p, {"rank": rank, "world": w, "public": publics[rank], "secret": keys[rank].secret.decode(),
                       "host": placement.host(rank), "gloo_host": placement.host(0),
                       "publics": publics, "gloo_port": gloo_port, "sizes": list(cfg.sizes),
                       "reps": cfg.reps, "ops": cfg.ops, "warmup": cfg.warmup, "methods": list(cfg.methods)})
        endpoints = [_read(p, cfg.startup_timeout, logs[i]) for i, p in enumerate(procs)]
        for p in procs:
            _write(p, {"endpoints": endpoints})
        results: list[dict[str, Any]] = [{}] * w
        for rank, p in enumerate(procs):
            while True:
                msg = _read(p, cfg.startup_timeout + 600, logs[rank])
                if "progress" in msg:
                    if rank == 0:
                        progress(f"W={w} {_human(msg['progress'])}")
                    continue
                results[rank] = msg
                break
        for p in procs:
            p.wait(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # by pid: these are our children
                p.wait()
        for log in logs:
            log.close()
    return _aggregate(w, cfg, results)


def _aggregate(w: int, cfg: BenchConfig, results: list[dict[str, Any]]) -> list[BenchRow]:
    rows = []
    for size in cfg.sizes:
        row = BenchRow(w, size)
        for m in cfg.methods:
            per_rep = [max(r["times"][str(size)][m][i] for r in results) for i in range(cfg.reps)]
            row.us[m] = statistics.median(per_rep) * 1e6
        rows.append(row)
    return rows


CHUNKS = 4  # the chunk count the chunked-star column runs with


def fitted_cost(rows: list[BenchRow]) -> LinkCost | None:
    """Fit the cost model's (a, b) to every measured CURVE star, chunked-star and ring figure."""
    samples = [(Algorithm(m), r.bytes, r.w, CHUNKS, r.us[m] * 1e-6)
               for r in rows for m in SECURE if m in r.us]
    try:
        return fit_from_allreduces(samples)
    except ValueError:
        return None


def auto_choice(row: BenchRow, cost: LinkCost) -> str:
    c = choose(row.bytes, row.w, cost)
    return c.algorithm.value + (f"×{c.chunks}" if c.chunks > 1 else "")


def _write(p: subprocess.Popen[str], obj: dict[str, Any]) -> None:
    assert p.stdin is not None
    p.stdin.write(json.dumps(obj) + "\n")
    p.stdin.flush()


def _read(p: subprocess.Popen[str], timeout: float, log: IO[str]) -> dict[str, Any]:
    import select

    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    line = p.stdout.readline() if ready else ""
    if not line:
        p.kill()
        p.wait()
        log.seek(0)
        tail = log.read()[-2000:]
        raise CollectiveError(f"benchmark worker (pid {p.pid}) stopped or stalled; its stderr:\n{tail}")
    return json.loads(line)


def _human(n: int) -> str:
    return f"{n // 1024} KiB" if n < 1024 * 1024 else f"{n // (1024 * 1024)} MiB"


# ------------------------------------------------------------------ worker side


def _worker() -> None:
    import torch
    import torch.distributed as dist

    from edgemesh.collective.members import CurveKeys, Peer
    from edgemesh.collective.tcp_links import SecureLinks
    from edgemesh.collective.group import CollectiveOptions, CollectiveGroup
    from edgemesh.bench.ocb_links import OcbLinks
    from edgemesh.bench.zmq_links import PeerLinks

    torch.set_num_threads(1)  # W processes share 2 cores; intra-op threads only add contention
    cfg = json.loads(sys.stdin.readline())
    rank, w = cfg["rank"], cfg["world"]
    host = cfg.get("host", "127.0.0.1")
    publics = [k.encode() for k in cfg["publics"]]
    keys = CurveKeys(cfg["public"].encode(), cfg["secret"].encode())
    methods = cfg["methods"]
    job = "bench-allreduce"
    links: dict[str, Any] = {"secure": SecureLinks.bind(f"tcp://{host}:0", keys, publics, job=job),
                             "plain": SecureLinks.bind(f"tcp://{host}:0", None, plain=True)}
    if any(m.endswith("_zmq") for m in methods):
        links["zmq"] = PeerLinks.bind(f"tcp://{host}:0", keys, publics)
    if any(m.endswith("_ocb") for m in methods):
        links["ocb"] = OcbLinks.bind(f"tcp://{host}:0", keys, publics)
    if any(m.endswith("_chacha") for m in methods):
        links["chacha"] = SecureLinks.bind(f"tcp://{host}:0", keys, publics, job=job, cipher="chacha20")
    print(json.dumps({k: v.endpoint for k, v in links.items()}), flush=True)
    eps = json.loads(sys.stdin.readline())["endpoints"]
    opts = CollectiveOptions(timeout=60, connect_timeout=60, chunks=CHUNKS)
    groups = {k: CollectiveGroup(v, rank, w, [Peer(r, eps[r][k], None if k == "plain" else publics[r])
                                            for r in range(w)], opts)
              for k, v in links.items()}
    if host != "127.0.0.1":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", _ifname_of(host))  # else gloo may pick loopback
    dist.init_process_group("gloo", init_method=f"tcp://{cfg.get('gloo_host', '127.0.0.1')}:{cfg['gloo_port']}",
                            rank=rank, world_size=w)
    one = torch.ones(1)

    def barrier() -> None:
        groups["plain"].allreduce_sum(one)

    def group_for(method: str) -> CollectiveGroup:
        """Every rank switches at the same point, so the group stays in agreement."""
        if method == "star_plain":
            return groups["plain"]
        kind = next((k for k in KINDS if method.endswith("_" + k)), "secure")
        g = groups[kind]
        algo = method.removesuffix("_" + kind).removesuffix("_bf16")
        g.options = replace(opts, algorithm=algo, compression="bfloat16" if method.endswith("_bf16") else None)
        return g

    times: dict[str, dict[str, list[float]]] = {}
    try:
        for size in cfg["sizes"]:
            x = torch.rand(size // 4, generator=torch.Generator().manual_seed(rank)) + 1.0
            per: dict[str, list[float]] = {m: [] for m in methods}
            for rep in range(-1, cfg["reps"]):  # rep −1 is the warm-up
                for method in methods:
                    n = cfg["warmup"] if rep < 0 else cfg["ops"]
                    if method == "gloo":
                        xg = x.clone()  # all_reduce works in place on a scratch copy
                        barrier()
                        t0 = time.perf_counter()
                        for _ in range(n):
                            dist.all_reduce(xg)
                    else:
                        g = group_for(method)
                        barrier()
                        t0 = time.perf_counter()
                        for _ in range(n):
                            g.allreduce_sum(x)
                    if rep >= 0:
                        per[method].append((time.perf_counter() - t0) / n)
            times[str(size)] = per
            print(json.dumps({"progress": size}), flush=True)
        ciphers = {k: sorted(set(v.ciphers.values())) for k, v in links.items() if hasattr(v, "ciphers")}
        print(json.dumps({"rank": rank, "times": times, "ciphers": ciphers}), flush=True)
    finally:
        dist.destroy_process_group()
        for g in groups.values():
            g.close()


def _ifname_of(address: str) -> str:
    """The interface that holds ``address`` (in this network namespace)."""
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[3].split("/")[0] == address:
            return parts[1]
    raise CollectiveError(f"no interface holds {address}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _worker()
    else:
        print("usage: python -m edgemesh.bench.allreduce --worker  (normally run by `edgemesh bench allreduce`)")
        sys.exit(2)
