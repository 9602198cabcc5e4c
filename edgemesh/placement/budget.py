"""Plan under a per-device memory budget: all in memory if it fits, else a sliding weight
window (ALGORITHMS §3) and a split whose predicted peak fits every device (pure functions).

1. Every device's memory is capped at the budget. If the ordinary plan fits and every
   device's predicted peak (``memory.predict_participant``, window 0) is within its limit,
   weights stay in memory: streaming them only costs time.
2. Otherwise weights stream through a window of w ≥ 2 blocks. A device's peak then grows
   with its share s as ``baseline + activations (+ the master's embedding/head window)
   + s·(window of full blocks + full KV cache)``, so its share is capped at what its budget
   holds and the ordinary planner spreads the decoder by speed within those caps. The exact
   peak of the resulting slices is checked (a device over its limit gets its cap shrunk by
   10 % and the split is redone); w = 2 must fit, and a larger w (more slack for disk jitter)
   is taken when it fits without changing the split.
3. If w = 2 does not fit, the plan is refused with what each device would need and has.

The no-stall check per device uses its slices' compute time (planner's GFLOP/s and memory
bandwidth model), the allreduce time and its disk read speed (profile ``read_mbyte_s`` /
measured ``disk_read_mbps``): ``t_a + t_ar ≥ τ_f`` and ``t_f + t_ar ≥ τ_a``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from edgemesh.errors import ConfigError
from edgemesh.placement.devices import Device, Link
from edgemesh.placement.memory import (
    RUNTIME_BASELINE_BYTES,
    MemoryPrediction,
    block_bytes,
    kv_cache_bytes,
    head_bytes,
    participant_blocks,
    predict_participant,
    window_blocks,
    window_bytes,
)
from edgemesh.placement.plan import Plan, Sizes, _slice_ms, plan
from edgemesh.weights.config import ModelConfig
from edgemesh.weights.shard import ShardSpec

MAX_WINDOW = 4
SHRINK, SHRINK_STEPS = 0.9, 12  # a share cap that missed its exact check is retried 10 % smaller
PROMPT_TOKENS = 128  # the forward the activation term is sized for (a prompt of this many tokens)
_HUGE = 1 << 60


def _mib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def plan_with_budget(
    config: ModelConfig,
    devices: list[Device],
    links: list[Link] | None = None,
    *,
    budget_bytes: int | None,
    model: str = "",
    context_len: int = 2048,
    dtype_bytes: int = 4,
    baseline_bytes: int = RUNTIME_BASELINE_BYTES,
    prompt_tokens: int = PROMPT_TOKENS,
    max_window: int = MAX_WINDOW,
    mlp_unit: int = 1,
) -> Plan:
    """``plan`` when ``budget_bytes`` is None; else a plan whose predicted peak per device is
    within min(budget, device memory), with ``Plan.window`` set, or ``ConfigError`` with the numbers."""
    if not budget_bytes:
        return plan(config, devices, links, model=model, context_len=context_len, dtype_bytes=dtype_bytes,
                    mlp_unit=mlp_unit)
    limits = {d.id: min(d.mem_bytes, budget_bytes) for d in devices}
    capped = [replace(d, mem_bytes=limits[d.id]) for d in devices]
    kw: dict[str, Any] = dict(model=model, context_len=context_len, dtype_bytes=dtype_bytes,
                              overhead_bytes=baseline_bytes, mlp_unit=mlp_unit)

    def predict(p: Plan, window: int) -> list[MemoryPrediction]:
        return [predict_participant(config, p.specs_for(k), k, dtype_bytes=dtype_bytes, window=window,
                                    context_len=context_len, tokens=prompt_tokens, baseline_bytes=baseline_bytes,
                                    world_size=p.world_size)
                for k in range(p.world_size)]

    def fits(p: Plan, preds: list[MemoryPrediction]) -> bool:
        return all(pr.total <= limits[d.id] for d, pr in zip(p.devices, preds))

    try:  # 1. all in memory
        p = plan(config, capped, links, **kw)
        preds = predict(p, 0)
        if fits(p, preds):
            return _finish(config, p, 0, preds, limits, devices, budget_bytes)
    except ConfigError:
        pass

    def windowed(w: int) -> tuple[Plan, list[MemoryPrediction]] | None:
        scale = {d.id: 1.0 for d in capped}
        for _ in range(SHRINK_STEPS):
            try:
                p = plan(config, _window_devices(config, capped, w, context_len, dtype_bytes, baseline_bytes,
                                                 prompt_tokens, scale), links, **kw)
            except ConfigError:
                return None
            preds = predict(p, w)
            if fits(p, preds):
                return p, preds
            # the share caps are estimates: shrink those of the devices over their limit and retry
            for dp, pr in zip(p.devices, preds):
                if pr.total > limits[dp.id]:
                    scale[dp.id] *= SHRINK
        return None

    best = windowed(2)  # 2. the smallest window, then larger ones that keep its split
    if best is None:
        raise ConfigError(_refusal(config, devices, links, limits, budget_bytes, kw, context_len, dtype_bytes,
                                   baseline_bytes, prompt_tokens))
    for w in range(3, max_window + 1):
        got = windowed(w)
        if got is not None and got[0].layers == best[0].layers:
            best = got
    p, preds = best
    return _finish(config, p, preds[0].window, preds, limits, devices, budget_bytes)


def _window_devices(config: ModelConfig, devices: list[Device], w: int, context_len: int, dtype_bytes: int,
                    baseline: int, tokens: int, scale: dict[str, float] | None = None) -> list[Device]:
    """Devices whose ``mem_bytes`` make the ordinary planner cap each share at what a
    ``w``-block window lets the real budget hold (its cap is (mem − fixed) / decoder · 0.98)."""
    c = config
    full = [ShardSpec.full(c)] * c.num_hidden_layers
    sz = Sizes.of(c, context_len, dtype_bytes)
    decoder = c.num_hidden_layers * (c.num_key_value_heads * (sz.group_bytes + sz.group_kv_bytes)
                                     + c.intermediate_size * sz.row_bytes)
    pair = [block_bytes(c, "attn_0", full[0], dtype_bytes), block_bytes(c, "mlp_0", full[0], dtype_bytes)]
    # Every rank's cyclic order ends with its rows of the head, a share of the whole head like its
    # MLP rows (llm.build.rank_files): a full share's window runs over the whole head too.
    per_share = (window_bytes(pair * c.num_hidden_layers + [head_bytes(c, c.vocab_size, dtype_bytes)], w)
                 + kv_cache_bytes(c, full, context_len))
    # A tied master's window also passes its embedding; w consecutive blocks of its order hold it
    # at most once beside blocks of its share, so the embedding on top of a share's window bounds
    # it. Untied, the embedding is not windowed (the lookup reads single rows).
    embedding = block_bytes(c, "input", None, dtype_bytes) if c.tie_word_embeddings else 0
    hidden_act = 6 * max(tokens, 1) * c.hidden_size * 4  # the residual stream: the same for any share
    out = []
    for k, d in enumerate(devices):
        fixed = baseline + c.num_hidden_layers * sz.layer_fixed_bytes + (sz.master_bytes if k == 0 else 0)
        extra = embedding if k == 0 else 0
        # Activations grow with the share (heads' scores, MLP rows, head rows) on top of the
        # residual stream; estimated from a full slice's, the exact check of the split follows.
        act = predict_participant(c, full, k, dtype_bytes=dtype_bytes, window=w, context_len=context_len,
                                  tokens=tokens, baseline_bytes=0).activations
        fixed_act = min(hidden_act, act)
        cap = max(d.mem_bytes - baseline - fixed_act - extra, 0) / (per_share + act - fixed_act)
        cap *= (scale or {}).get(d.id, 1.0)
        out.append(replace(d, mem_bytes=int(fixed + min(cap, 1e6) * decoder / 0.98)))
    return out


def _refusal(config: ModelConfig, devices: list[Device], links: list[Link] | None, limits: dict[str, int],
             budget: int, kw: dict[str, Any], context_len: int, dtype_bytes: int, baseline: int, tokens: int) -> str:
    """What each device would need with a 2-block window and the split by speed alone."""
    try:
        p = plan(config, [replace(d, mem_bytes=_HUGE) for d in devices], links, **kw)
    except ConfigError as exc:
        return f"memory budget {_mib(budget)} per device: {exc}"
    parts = []
    for k, d in enumerate(p.devices):
        pr = predict_participant(config, p.specs_for(k), k, dtype_bytes=dtype_bytes, window=2,
                                 context_len=context_len, tokens=tokens, baseline_bytes=baseline,
                                 world_size=p.world_size)
        if pr.total > limits[d.id]:
            parts.append(f"{d.id} needs {_mib(pr.total)} (runtime {_mib(pr.baseline)} + 2-block window "
                         f"{_mib(pr.weights)} + KV cache {_mib(pr.kv_cache)} + activations {_mib(pr.activations)}) "
                         f"but has {_mib(limits[d.id])}")
    why = "; ".join(parts) or "no split within every device's budget"
    return (f"memory budget {_mib(budget)} per device cannot hold this model even with a 2-block weight window: "
            f"{why}; raise --memory-budget, add devices or shorten the context (now {context_len} tokens)")


def _finish(config: ModelConfig, p: Plan, window: int, preds: list[MemoryPrediction], limits: dict[str, int],
            devices: list[Device], budget: int) -> Plan:
    by_id = {d.id: d for d in devices}
    p.devices = [replace(dp, mem_bytes=pr.total, mem_limit=limits[dp.id], overhead_bytes=pr.baseline)
                 for dp, pr in zip(p.devices, preds)]
    p.window = window
    p.memory_budget = budget
    p.window_checks = [no_stall_check(config, p, k, by_id[dp.id], pr) for k, (dp, pr) in enumerate(zip(p.devices, preds))]
    if window:
        worst = max((c["stall_ms_per_token"] for c in p.window_checks if c["stall_ms_per_token"] is not None),
                    default=0.0)
        p.latency = replace(p.latency, total_ms=round(p.latency.total_ms + worst, 4))
        p.notes.append(f"weights stream from disk through a {window}-block window per device "
                       f"(budget {_mib(budget)}); predicted disk stall {worst:.1f} ms/token is included")
        for c in p.window_checks:
            if c["no_stall"] is False:
                p.notes.append(f"{c['id']}: disk too slow to hide (t_a + t_ar = {c['t_a_ms'] + c['t_ar_ms']:.2f} ms vs "
                               f"τ_f = {c['tau_f_ms']:.2f} ms; t_f + t_ar = {c['t_f_ms'] + c['t_ar_ms']:.2f} ms vs "
                               f"τ_a = {c['tau_a_ms']:.2f} ms)")
            elif c["no_stall"] is None:
                p.notes.append(f"{c['id']}: disk read speed unknown, no-stall check skipped")
    return p


def no_stall_check(config: ModelConfig, p: Plan, rank: int, device: Device, pred: MemoryPrediction) -> dict[str, Any]:
    """Per device: compute per block, allreduce, disk load per block, the two conditions and the
    predicted stall per token (w = 2: each load has the previous gap + one block + the next
    gap to hide behind; w ≥ 3: the disk must at least keep up over a whole token)."""
    c = config
    specs = p.specs_for(rank)
    db = p.dtype_bytes
    lat = p.latency
    t_ar = (lat.allreduce_latency_ms + lat.bandwidth_ms) / lat.allreduces_per_token if p.world_size > 1 else 0.0
    blocks = (window_blocks if p.window else participant_blocks)(c, specs, rank, db, p.world_size)
    disk = device.disk_mbyte_s

    def compute_ms(name: str, nbytes: int) -> float:
        return 0.0 if name == "input" else _slice_ms(device, nbytes // db, nbytes)

    ts = [compute_ms(n, b) for n, b in blocks]
    taus = [1e3 * b / (disk * 1e6) if disk > 0 else None for _, b in blocks]
    gaps = [t_ar if (n.startswith(("attn", "mlp")) and m.startswith(("attn", "mlp"))) else t_ar / 2
            for (n, _), (m, _) in zip(blocks, blocks[1:] + blocks[:1])]  # gap after block i
    attn = [i for i, (n, _) in enumerate(blocks) if n.startswith("attn")]
    mlp = [i for i, (n, _) in enumerate(blocks) if n.startswith("mlp")]
    t_a = max((ts[i] for i in attn), default=0.0)
    t_f = max((ts[i] for i in mlp), default=0.0)
    tau_a = max((taus[i] or 0.0 for i in attn), default=0.0) if disk > 0 else None
    tau_f = max((taus[i] or 0.0 for i in mlp), default=0.0) if disk > 0 else None
    ok = None if tau_a is None or tau_f is None else (t_a + t_ar >= tau_f and t_f + t_ar >= tau_a)
    stall = None
    if p.window and disk > 0:
        n = len(blocks)
        if p.window == 2:
            stall = sum(max(0.0, taus[(i + 1) % n] - (gaps[i - 1] + ts[i] + gaps[i])) for i in range(n))  # type: ignore[operator]
        else:
            stall = max(0.0, sum(taus) - sum(ts) - sum(gaps))  # type: ignore[arg-type]
    return {"id": device.id, "window": p.window, "peak_bytes": pred.total, "limit_bytes": p.devices[rank].mem_limit,
            "baseline_bytes": pred.baseline, "weights_bytes": pred.weights, "kv_cache_bytes": pred.kv_cache,
            "activation_bytes": pred.activations, "t_a_ms": round(t_a, 3), "t_f_ms": round(t_f, 3),
            "t_ar_ms": round(t_ar, 3), "tau_a_ms": None if tau_a is None else round(tau_a, 3),
            "tau_f_ms": None if tau_f is None else round(tau_f, 3), "disk_mbyte_s": disk, "no_stall": ok,
            "stall_ms_per_token": None if stall is None else round(stall, 3)}
