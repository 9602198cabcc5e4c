"""`edgemesh bench generate`: decode speed over N members against one device and against the
analytic bound, plus bytes on the wire per token against the theory — in one run.

Bound (issue 6): compute of the slowest slice + 2·L·(measured star allreduce latency).
The decode steps, the star latency and the slices' compute are measured in interleaved
rounds (``MEASURE_ROUNDS``), so that a drift of the host's speed moves all of them alike.
The slowest slice is measured in the live deployment: every rank runs decode steps of its own
slices at the same time but without communication (every rank's include the final norm and its
vocabulary rows of the head, the master's also the embedding),
so ranks that share a machine also share its cores and memory bandwidth, as when serving; on
separate machines this is the same as each slice alone. The star latency is measured through
the live group with hidden-size messages. For reference the master's and the largest worker
slice are also timed alone in this process after the cluster is released.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from edgemesh.collective.base import LocalCollective
from edgemesh.identity.statedir import StateDir
from edgemesh.llm.build import rank_files
from edgemesh.llm.model import Participant
from edgemesh.placement.plan import Plan
from edgemesh.config import LaunchOptions
from edgemesh.runtime.deploy import Deployment, probe_allreduce
from edgemesh.llm.measure import solo_compute_ms
from edgemesh.llm.sampling import Sampler, SamplingParams
from edgemesh.weights.shard import vocab_range
from edgemesh.weights.provider import InMemoryProvider
from edgemesh.weights.store import ModelEntry
from edgemesh.wire.tensor import Q8, q8_nbytes


@dataclass
class RunResult:
    nodes: int
    ttft_ms: float
    ms_per_token: float  # median decode step
    mean_ms_per_token: float
    tokens_per_s: float
    bytes_per_token: float | None = None  # the hub's data-plane bytes, both directions
    star_us: float | None = None
    compute_ms: float | None = None  # slowest rank's decode-step compute, all ranks at once
    compute_rank: int | None = None
    compute_per_rank_ms: list[float] | None = None
    alone_ms: float | None = None  # slowest of master / largest worker slice, each alone
    master_collective_ms: float | None = None  # per token, inside collectives (incl. waiting)
    prefill_ms: float | None = None  # TTFT of a PREFILL_TOKENS prompt
    # Each rank's compute of that prefill with no communication, all ranks at once (ranks that
    # share cores share them here too): where a split prefill waits for its slowest rank.
    prefill_per_rank_ms: list[float] | None = None
    link_cost: tuple[float, float] | None = None  # the group's cost model (a s/hop, b B/s)
    algorithms: dict[str, str] | None = None  # what the group runs for a decode / a prefill message
    prefill_overlap: bool | None = None  # the prefill's allreduces overlapped with compute (two chunks)
    shared_memory: bool | None = None  # the group's float32 allreduces went through shared memory (collective/shm.py)


class _TimedCollective:
    """Wraps the master's collective for one measurement: how long the master spends inside
    collectives (sending, waiting for the slowest worker, receiving) vs. computing."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.seconds = 0.0
        self.calls = 0

    @property
    def total_seconds(self) -> float:
        """Inside collectives so far: the wrapped calls, plus the ops that the native decode
        loop ran in C (timed there: Python does not see them)."""
        natives = getattr(self._inner, "_native", {})
        # One counter per C context (the shared-memory plane's serves every size once).
        return self.seconds + sum({a.ctx: a.seconds for a in natives.values() if a is not None}.values())

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in ("allreduce_sum", "broadcast", "broadcast_meta", "gather"):
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t
                self.calls += 1
        return timed


PREFILL_TOKENS = 256
MEASURE_ROUNDS = 4  # interleaved rounds of decode steps (and, in a group, in-band ops and solo compute)
PROBES_PER_ROUND = 50


def _decode(model: Participant, prompt: list[int], tokens: int,
            inside: list[float] | None = None) -> tuple[float, list[float], int]:
    """TTFT, each decode step's seconds and the wire bytes of the decode; ``inside`` (with the
    model's collective a ``_TimedCollective``) gets each step's seconds inside collectives.
    Greedy, through ``forward_choose``: the serving path (a distributed argmax, no logits)."""
    greedy = Sampler(SamplingParams())
    with torch.inference_mode():
        t0 = time.perf_counter()
        tok = model.forward_choose(torch.tensor([prompt]), 0, greedy)
        ttft = time.perf_counter() - t0
        pos = len(prompt)
        wire = getattr(model.collective, "wire_bytes", (0, 0))
        steps = []
        for _ in range(tokens):
            t = time.perf_counter()
            before = model.collective.total_seconds if inside is not None else 0.0  # type: ignore[attr-defined]
            tok = model.forward_choose(torch.tensor([[tok]]), pos, greedy)
            steps.append(time.perf_counter() - t)
            if inside is not None:
                inside.append(model.collective.total_seconds - before)  # type: ignore[attr-defined]
            pos += 1
        after = getattr(model.collective, "wire_bytes", (0, 0))
    return ttft, steps, sum(after) - sum(wire)


def _slice_ms(entry: ModelEntry, plan: Plan, rank: int, prompt: list[int], tokens: int, max_seq_len: int,
              threads: int) -> float:
    if threads:
        torch.set_num_threads(threads)  # as the rank ran it (the pool thread's own setting)
    specs = plan.specs_for(rank)
    blocks = {b: entry.load_slice(ref) for b, ref in rank_files(entry, specs, rank, plan.world_size).items()}
    p = Participant(entry.config, specs, InMemoryProvider(blocks), LocalCollective(), max_seq_len=max_seq_len,
                    vocab=vocab_range(entry.config, specs, rank, plan.world_size))
    h = entry.config.hidden_size
    steps = []
    with torch.inference_mode():
        if rank == 0:
            p.forward(torch.tensor([prompt]), 0, last_only=True)
            for i in range(tokens):
                t = time.perf_counter()
                p.forward(torch.tensor([[1]]), len(prompt) + i)
                steps.append(time.perf_counter() - t)
        else:
            p.run_layers(torch.zeros(1, len(prompt), h), 0)
            for i in range(tokens):
                t = time.perf_counter()
                p.head(p.run_layers(torch.zeros(1, 1, h), len(prompt) + i))
                steps.append(time.perf_counter() - t)
    return statistics.median(steps) * 1000


async def run_once(state: StateDir, entry: ModelEntry, nodes: int, prompt: list[int], tokens: int,
                   max_seq_len: int, progress: Callable[[str], None], with_bound: bool,
                   wire_dtype: str | None = None) -> tuple[RunResult, Plan]:
    dep = Deployment(state, entry, LaunchOptions(nodes=nodes, max_seq_len=max_seq_len, compression=wire_dtype),
                     progress)
    await dep.open()
    try:
        model = await dep.deploy()
        assert dep.plan is not None

        def pinned_work() -> RunResult:
            dep.prepare_compute_thread()  # on this pool thread only while it runs the model
            try:
                return work()
            finally:
                dep.release_compute_thread()

        def work() -> RunResult:
            _decode(model, prompt[:8], 4)  # warm-up: allocations, first-touch of weights
            group = dep.plan.world_size > 1
            if group:
                probe_allreduce(model, 20)  # warm-up of the probe's path
            # The decode steps and the bound's two parts (the in-band op, each rank's compute
            # alone) are measured in interleaved rounds: a host whose speed drifts between
            # minutes (a VM's neighbours) then moves all three alike, and their ratio keeps
            # its meaning. One device runs the same rounds (the same contexts, a TTFT from
            # as many prefills), without the bound's parts.
            rounds = MEASURE_ROUNDS if tokens >= MEASURE_ROUNDS else 1
            steps: list[float] = []
            ttfts: list[float] = []
            probes: list[float] = []
            solos: list[list[float]] = []
            nbytes = 0
            for i in range(rounds):
                n = tokens // rounds + (1 if i < tokens % rounds else 0)
                ttft, got, b = _decode(model, prompt, n)
                ttfts.append(ttft)
                steps += got
                nbytes += b
                if group:
                    probes += probe_allreduce(model, PROBES_PER_ROUND)
                    solos.append(solo_compute_ms(model, n, len(prompt) + tokens + 1))
            med = statistics.median(steps)
            res = RunResult(nodes=dep.plan.world_size, ttft_ms=statistics.median(ttfts) * 1000, ms_per_token=med * 1000,
                            mean_ms_per_token=statistics.fmean(steps) * 1000, tokens_per_s=1 / med)
            if PREFILL_TOKENS + 1 <= max_seq_len:  # TTFT of a long prompt: the prefill's throughput
                long_prompt = [(prompt[i % len(prompt)] + i) % dep.entry.config.vocab_size for i in range(PREFILL_TOKENS)]
                res.prefill_ms = min(_decode(model, long_prompt, 0)[0] for _ in range(2)) * 1000
                if group:
                    res.prefill_per_rank_ms = [round(v, 1) for v in solo_compute_ms(model, 3, 0, PREFILL_TOKENS)]
            if group:
                h = dep.entry.config.hidden_size
                res.prefill_overlap = model.overlap_applies(PREFILL_TOKENS)
                chunk = PREFILL_TOKENS // 2 if res.prefill_overlap else PREFILL_TOKENS
                res.link_cost = (dep.link_cost.a, dep.link_cost.b)
                res.shared_memory = bool(getattr(model.collective, "shared_memory", False))
                res.algorithms = {what: "shared memory" if res.shared_memory else _named(model.collective.choice(n * h * 4))
                                  for what, n in (("decode", 1), ("prefill", chunk))}
                res.bytes_per_token = nbytes / tokens
                # Where the master's time goes, in a separate run (the wrapper costs a little).
                # Per step, median, as ms_per_token: one stalled step (a busy host) would
                # otherwise lift a mean above the median step it is compared with.
                inner = model.collective
                inside: list[float] = []
                model.collective = _TimedCollective(inner)  # type: ignore[assignment]
                try:
                    _decode(model, prompt[:1], tokens, inside)
                finally:
                    model.collective = inner
                res.master_collective_ms = statistics.median(inside) * 1000
                res.star_us = statistics.median(probes) * 1e6
                per_rank = [statistics.median(s[k] for s in solos) for k in range(len(solos[0]))]
                # Keep one value per rank: the slowest is reported from the same rounded list,
                # so the JSON's maximum and its per-rank figures never disagree by a rounding.
                res.compute_per_rank_ms = [round(v, 3) for v in per_rank]
                res.compute_rank = max(range(len(per_rank)), key=res.compute_per_rank_ms.__getitem__)
                res.compute_ms = res.compute_per_rank_ms[res.compute_rank]
            return res

        progress(f"measuring {tokens} decode steps on {dep.plan.world_size} device(s)")
        result = await asyncio.to_thread(pinned_work)
        plan = dep.plan
    finally:
        await dep.close()
    if with_bound and plan.world_size > 1:
        # Slowest slice, measured alone while the cluster is idle: the master (head included)
        # and the worker holding the most weights.
        progress("measuring the compute of the largest slices")
        worker = max(plan.devices[1:], key=lambda d: d.weight_bytes).rank
        threads = dep.threads0 or torch.get_num_threads()
        times = {r: await asyncio.to_thread(_slice_ms, entry, plan, r, prompt, tokens, max_seq_len, threads)
                 for r in (0, worker)}
        result.alone_ms = max(times.values())
    return result, plan


def _named(choice: Any) -> str:
    k = f" x{choice.chunks}" if choice.chunks > 1 else ""
    return f"{choice.algorithm.value}{k}"


def wire_bytes(values: int, wire_dtype: str | None) -> int:
    """Bytes of ``values`` fp32 partial sums on the wire (``--wire-dtype``)."""
    if wire_dtype == Q8:
        return q8_nbytes(values)
    return values * (2 if wire_dtype in ("float16", "bfloat16") else 4)


async def bench(state: StateDir, entry: ModelEntry, nodes: int, prompt: list[int], tokens: int,
                max_seq_len: int, progress: Callable[[str], None], wire_dtype: str | None = None) -> dict[str, Any]:
    single, _ = await run_once(state, entry, 1, prompt, tokens, max_seq_len, progress, with_bound=False)
    multi, plan = await run_once(state, entry, nodes, prompt, tokens, max_seq_len, progress, with_bound=True,
                                 wire_dtype=wire_dtype)
    c = entry.config
    w, h, layers = multi.nodes, c.hidden_size, c.num_hidden_layers
    # Per decode token the hub sends the hidden state to W-1 workers once (fp32), in each of the
    # 2L star allreduces receives W-1 partial sums and sends W-1 results (in the wire dtype), and
    # receives W-1 greedy choice summaries (5 float64: range, max, index) in the closing gather.
    # Through shared memory the allreduces put nothing on the wire.
    per_layer = 0 if multi.shared_memory else 4 * layers * wire_bytes(h, wire_dtype)
    theory = (w - 1) * (h * 4 + per_layer + 5 * 8) if w > 1 else 0
    # The head is split by vocabulary, so every rank's measured slice includes its head rows.
    # As the hidden state's broadcast, the choice's closing gather (one hop of 40 bytes per
    # worker) is left out: the bound counts the 2L round trips.
    bound = None
    if multi.compute_ms is not None and multi.star_us is not None:
        bound = multi.compute_ms + 2 * layers * multi.star_us / 1000
    return {
        "model": entry.name, "nodes": w, "tokens": tokens, "prompt_tokens": len(prompt),
        "wire_dtype": wire_dtype or "float32",
        "ms_per_token": round(multi.ms_per_token, 2),
        "bound_ms_per_token": None if bound is None else round(bound, 2),
        "single_ms_per_token": round(single.ms_per_token, 2),
        "ttft_ms": round(multi.ttft_ms, 1), "single_ttft_ms": round(single.ttft_ms, 1),
        "prefill_ms": None if multi.prefill_ms is None else round(multi.prefill_ms, 1),
        "single_prefill_ms": None if single.prefill_ms is None else round(single.prefill_ms, 1),
        "prefill_tokens": PREFILL_TOKENS,
        "ms_per_token_by_rank": multi.compute_per_rank_ms,
        "prefill_ms_by_rank": multi.prefill_per_rank_ms,
        "tokens_per_s": round(multi.tokens_per_s, 2), "single_tokens_per_s": round(single.tokens_per_s, 2),
        "bytes_per_token": None if multi.bytes_per_token is None else round(multi.bytes_per_token),
        "bytes_per_token_theory": theory,
        "star_allreduce_us": None if multi.star_us is None else round(multi.star_us, 1),
        "largest_slice_compute_ms": None if multi.compute_ms is None else round(multi.compute_ms, 2),
        "largest_slice_rank": multi.compute_rank,
        "slice_compute_per_rank_ms": multi.compute_per_rank_ms,
        "largest_slice_alone_ms": None if multi.alone_ms is None else round(multi.alone_ms, 2),
        "master_in_collectives_ms_per_token": None if multi.master_collective_ms is None else round(multi.master_collective_ms, 2),
        "predicted_ms_per_token": round(plan.latency.total_ms, 2),
        "link_cost": None if multi.link_cost is None else {"hop_us": round(multi.link_cost[0] * 1e6, 1),
                                                            "mbyte_s": round(multi.link_cost[1] / 1e6, 2)},
        "algorithms": multi.algorithms,
        "prefill_overlap": multi.prefill_overlap,
        "shared_memory": multi.shared_memory,
        "runs": {"single": asdict(single), "multi": asdict(multi)},
        "targets": {"ms_per_token_over_bound_max": 1.25, "bytes_over_theory_max": 1.05},
    }
