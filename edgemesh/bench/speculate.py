"""`edgemesh bench generate --speculate MODE`: plain and speculative decoding side by side, in
one deployment, for several prompt kinds.

Each kind's prompt runs greedy twice on the same live group — plain steps, then speculative —
and the two token lists are compared. A rewrite and a code edit repeat much of their input, so
prompt lookup has a lot to propose; an open chat question has little, and there speculation
must switch itself off rather than slow the answer down.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import torch

from edgemesh.identity.statedir import StateDir
from edgemesh.llm.generate import generate
from edgemesh.llm.model import Participant
from edgemesh.llm.sampling import Sampler, SamplingParams
from edgemesh.llm.speculate import AdaptiveK, SpecStats, speculative_generate
from edgemesh.llm.tokenizer import ChatTokenizer
from edgemesh.config import LaunchOptions
from edgemesh.runtime.deploy import Deployment
from edgemesh.runtime.speculation import k_max_for, proposer_factory
from edgemesh.weights.store import ModelEntry

_PARAGRAPH = ("The old lighthouse stood at the edge of the cliff for more than a century. Sailors relied on its "
              "beam to find their way home through storms and fog. When the keeper retired, the town voted to keep "
              "the light burning, and volunteers took turns climbing the spiral stairs every evening.")
_CODE = ("def total(items, tax):\n    result = 0\n    for item in items:\n        result += item.price * item.quantity\n"
         "    return result * (1 + tax)\n")
PROMPTS = {
    "rewrite": f"Rewrite the following paragraph in the past perfect tense, keeping everything else the same:\n\n{_PARAGRAPH}",
    "code": f"Add type hints to this Python function and keep the rest unchanged:\n\n{_CODE}",
    "chat": "What are three good habits for staying healthy?",
}


def _timed(tokens: Any) -> tuple[list[int], float]:
    """Tokens of a generator and the seconds from the first token to the last (decode only)."""
    out: list[int] = []
    first = 0.0
    for tok in tokens:
        out.append(tok)
        if len(out) == 1:
            first = time.perf_counter()
    return out, time.perf_counter() - first


def run_kinds(model: Participant, tokenizer: ChatTokenizer, proposer: Callable[[], Any], k_max: int,
              tokens: int, progress: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    stops = tokenizer.stop_ids()
    out: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        generate(model, tokenizer.encode_chat([{"role": "user", "content": "Hi"}]), 4)  # warm-up
        for kind, text in PROMPTS.items():
            progress(f"{kind}: plain, then speculative")
            ids = tokenizer.encode_chat([{"role": "user", "content": text}])
            plain, t_plain = _timed(generate(model, ids, tokens, stop_ids=stops))
            stats = SpecStats()
            spec, t_spec = _timed(speculative_generate(model, ids, tokens, proposer(), stops,
                                                       sampler=Sampler(SamplingParams()),
                                                       k=AdaptiveK(k=min(4, k_max), k_max=k_max), stats=stats))
            spec_steps = stats.steps - stats.plain_steps
            out[kind] = {
                "tokens": len(plain),
                "ms_per_token_plain": round(t_plain * 1000 / max(len(plain) - 1, 1), 2),
                "ms_per_token_speculative": round(t_spec * 1000 / max(len(spec) - 1, 1), 2),
                "acceptance_rate": round(stats.acceptance_rate, 3),
                "mean_accepted_per_step": round(stats.accepted / spec_steps, 2) if spec_steps else 0.0,
                "proposed": stats.proposed, "accepted": stats.accepted, "steps": stats.steps,
                "switched_off": stats.disabled,
                "identical_greedy": plain == spec,
            }
            out[kind]["speedup"] = round(out[kind]["ms_per_token_plain"] / out[kind]["ms_per_token_speculative"], 2)
    return out


async def bench_speculate(state: StateDir, entry: ModelEntry, store_dir: Any, nodes: int, mode: str, tokens: int,
                          max_seq_len: int, progress: Callable[[str], None]) -> dict[str, Any]:
    tokenizer = ChatTokenizer.from_entry(entry)
    proposer = proposer_factory(mode, store_dir, entry, max_seq_len)
    if proposer is None:
        raise ValueError("nothing to compare with --speculate off")
    dep = Deployment(state, entry, LaunchOptions(nodes=nodes, max_seq_len=max_seq_len), progress)
    await dep.open()
    try:
        model = await dep.deploy()

        def work() -> dict[str, dict[str, Any]]:
            dep.prepare_compute_thread()
            try:
                return run_kinds(model, tokenizer, proposer, k_max_for(entry), tokens, progress)
            finally:
                dep.release_compute_thread()

        by_kind = await asyncio.to_thread(work)
        world = dep.plan.world_size if dep.plan else 1
    finally:
        await dep.close()
    return {"model": entry.name, "nodes": world, "speculate": mode, "max_tokens": tokens,
            **{k: v for k, v in by_kind["rewrite"].items()}, "by_kind": by_kind,
            "targets": {"rewrite_speedup_min": 2.0, "slowest_kind_speedup_min": 0.95}}
