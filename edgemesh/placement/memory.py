"""Predicted peak memory of one participant, with or without a weight window (pure functions).

peak = runtime baseline + weights + KV cache + activations, where

- weights: all of the participant's blocks (window 0), or the largest sum of ``w``
  *consecutive* blocks of its cyclic execution order (the loader holds a block from the moment
  it starts reading it until the compute thread releases it, and it reads in order);
- KV cache: fp32 keys and values of its own KV heads at the full context;
- activations: the transients of one forward of ``tokens`` tokens: hidden states, the larger
  of the attention block's (q/k/v, keys expanded over the query heads of a group, scores) and
  the MLP block's (gate, up, product), the master's logits, and for int8 weights the fp32
  copy a dequantizing matmul makes of its largest matrix;
- baseline: Python + torch + edgemesh in the process before any weight is loaded. Measured
  here (Python 3.11, torch 2.13, x86-64): 233 MB after ``import torch``, 249 MB with the model,
  collective and zmq modules; a daemon-started worker also runs asyncio/rpc code, hence
  ``RUNTIME_BASELINE_BYTES``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edgemesh.weights.config import ModelConfig
from edgemesh.weights.shard import ShardSpec, vocab_range

MiB = 1 << 20
RUNTIME_BASELINE_BYTES = 280 * MiB
SCALE_BYTES = 4  # int8 matrices carry one fp32 scale per output row


@dataclass(frozen=True)
class MemoryPrediction:
    baseline: int
    weights: int  # resident weights at the peak (the window, or everything)
    kv_cache: int
    activations: int
    window: int  # 0 = every block in memory

    @property
    def total(self) -> int:
        return self.baseline + self.weights + self.kv_cache + self.activations

    def to_json(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def _float_bytes(dtype_bytes: int) -> int:
    return 4 if dtype_bytes == 1 else dtype_bytes  # int8 models keep norms, biases and scales in fp32


def _matrix(rows: int, cols: int, dtype_bytes: int) -> int:
    return rows * cols * dtype_bytes + (rows * SCALE_BYTES if dtype_bytes == 1 else 0)


def block_bytes(config: ModelConfig, block: str, spec: ShardSpec | None, dtype_bytes: int) -> int:
    """Bytes of one block as a participant holds it (``spec`` for decoder blocks)."""
    c, db, fb = config, dtype_bytes, _float_bytes(dtype_bytes)
    h, d, g = c.hidden_size, c.head_dim, c.group_size
    if block == "input":
        return _matrix(c.vocab_size, h, db)
    if block == "output":
        return h * fb + (0 if c.tie_word_embeddings else _matrix(c.vocab_size, h, db))
    if spec is None:
        raise ValueError(f"decoder block {block!r} needs its shard spec")
    if block.startswith("attn_"):
        nkv = len(spec.kv_groups)
        nq = nkv * g
        n = h * fb + _matrix(nq * d, h, db) + 2 * _matrix(nkv * d, h, db)
        n += h * nq * d * db + (h * SCALE_BYTES if db == 1 else 0)  # wo: columns, all row scales
        if c.qkv_bias:
            n += (nq + 2 * nkv) * d * fb
        if c.o_bias and spec.adds_bias:
            n += h * fb
        return n
    if block.startswith("mlp_"):
        f = spec.mlp_size
        n = h * fb + 2 * _matrix(f, h, db) + h * f * db + (h * SCALE_BYTES if db == 1 else 0)
        if c.mlp_bias:
            n += 2 * f * fb + (h * fb if spec.adds_bias else 0)
        return n
    raise ValueError(f"unknown block {block!r}")


def head_bytes(config: ModelConfig, rows: int, dtype_bytes: int) -> int:
    """An ``output`` slice with ``rows`` vocabulary rows of the head (``weights.shard.slice_head``)."""
    return config.hidden_size * _float_bytes(dtype_bytes) + _matrix(rows, config.hidden_size, dtype_bytes)


def participant_blocks(config: ModelConfig, specs: list[ShardSpec], rank: int,
                       dtype_bytes: int, world_size: int | None = None) -> list[tuple[str, int]]:
    """(block, bytes) in the participant's execution order (see ``weights.window.execution_order``).
    ``world_size``: the head is split by vocabulary over that many ranks (``llm.build.rank_files``);
    None: the whole head on rank 0 (a hand-built group)."""
    out = [("input", block_bytes(config, "input", None, dtype_bytes))] if rank == 0 else []
    for i, spec in enumerate(specs):
        out.append((f"attn_{i}", block_bytes(config, f"attn_{i}", spec, dtype_bytes)))
        out.append((f"mlp_{i}", block_bytes(config, f"mlp_{i}", spec, dtype_bytes)))
    if world_size is not None and world_size > 1:
        start, stop = vocab_range(config, specs, rank, world_size)
        tied0 = rank == 0 and config.tie_word_embeddings  # its head rows are in the embedding
        out.append(("output", block_bytes(config, "output", None, dtype_bytes) if tied0
                    else head_bytes(config, stop - start, dtype_bytes)))
        if tied0:
            out.append(("input", out[0][1]))
    elif rank == 0:
        out.append(("output", block_bytes(config, "output", None, dtype_bytes)))
        if config.tie_word_embeddings:
            out.append(("input", out[0][1]))
    return out


def window_blocks(config: ModelConfig, specs: list[ShardSpec], rank: int,
                  dtype_bytes: int, world_size: int | None = None) -> list[tuple[str, int]]:
    """The blocks a sliding window cycles through (``weights.window.execution_order``): the
    participant's blocks without an untied master's embedding, whose lookup reads single rows."""
    blocks = participant_blocks(config, specs, rank, dtype_bytes, world_size)
    if rank == 0 and not config.tie_word_embeddings:
        blocks = [(n, b) for n, b in blocks if n != "input"]
    return blocks


def window_bytes(sizes: list[int], window: int) -> int:
    """Largest sum of ``window`` cyclically consecutive sizes; all of them for window 0."""
    if window <= 0 or window >= len(sizes):
        return sum(sizes)
    ext = sizes + sizes[:window - 1]
    run = sum(ext[:window])
    best = run
    for i in range(window, len(ext)):
        run += ext[i] - ext[i - window]
        best = max(best, run)
    return best


def kv_cache_bytes(config: ModelConfig, specs: list[ShardSpec], context_len: int, batch: int = 1) -> int:
    return sum(2 * batch * len(s.kv_groups) * context_len * config.head_dim * 4 for s in specs)


def activation_bytes(config: ModelConfig, specs: list[ShardSpec], rank: int, *, tokens: int,
                     context_len: int, dtype_bytes: int, world_size: int | None = None) -> int:
    c = config
    h, d, g, t = c.hidden_size, c.head_dim, c.group_size, max(tokens, 1)
    nkv = max((len(s.kv_groups) for s in specs), default=0)
    nq = nkv * g
    f = max((s.mlp_size for s in specs), default=0)
    hidden = 6 * t * h * 4  # h, the partial, the allreduced sum, the norm's output, the residual
    attn = t * (2 * nq + 2 * nkv) * d * 4  # q, y, k, v
    if g > 1:
        attn += 2 * nq * context_len * d * 4  # keys / values repeated over each group's query heads
    attn += nq * t * max(t, context_len if t == 1 else t) * 4  # scores
    mlp = 3 * t * f * 4
    act = hidden + max(attn, mlp)
    split = world_size is not None and world_size > 1
    rows = (lambda r: r[1] - r[0])(vocab_range(c, specs, rank, world_size)) if split and specs else (
        c.vocab_size if rank == 0 else 0)
    if dtype_bytes == 1:  # a dequantizing matmul makes an fp32 copy of its weight
        largest = max(nq * d * h, f * h, rows * h)
        act += 4 * largest
    act += 2 * rows * 4  # logits of its head rows at the last position (+ the choice's copy)
    if rank == 0 and split:
        act += 2 * c.vocab_size * 4  # the whole logits, where a caller gathers them
    return act


def predict_participant(config: ModelConfig, specs: list[ShardSpec], rank: int, *, dtype_bytes: int,
                        window: int, context_len: int, tokens: int = 128,
                        baseline_bytes: int = RUNTIME_BASELINE_BYTES,
                        block_sizes: list[int] | None = None, world_size: int | None = None) -> MemoryPrediction:
    """Peak memory of ``rank`` holding ``specs`` with a ``window``-block window (0 = all in
    memory), for a forward of up to ``tokens`` tokens. ``block_sizes`` (in execution order,
    e.g. the real file sizes; with a window, of ``window_blocks``) replace the computed sizes. ``world_size``: as in
    ``participant_blocks``."""
    blocks = (window_blocks if window > 0 else participant_blocks)(config, specs, rank, dtype_bytes, world_size)
    sizes = block_sizes if block_sizes is not None else [b for _, b in blocks]
    if window <= 0:  # the tied head's second ``input`` is the same tensors
        names = [n for n, _ in blocks]
        weights = sum(dict(zip(names, sizes)).values()) if len(names) == len(sizes) else sum(sizes)
    else:
        weights = window_bytes(sizes, window)
    return MemoryPrediction(baseline_bytes, weights, kv_cache_bytes(config, specs, context_len),
                            activation_bytes(config, specs, rank, tokens=tokens, context_len=context_len,
                                             dtype_bytes=dtype_bytes, world_size=world_size), max(window, 0))


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'2GiB', '384MiB', '1.5GB', '500M' (M/G = powers of 1000, MiB/GiB = of 1024) → bytes."""
    from edgemesh.errors import ConfigError

    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text or "")
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ConfigError(f"memory size {text!r}: write a number and a unit, e.g. 2GiB, 384MiB or 1.5GB")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n < 64 * MiB:
        raise ConfigError(f"memory size {text!r} is below 64 MiB: too small for a Python + torch process")
    return n
