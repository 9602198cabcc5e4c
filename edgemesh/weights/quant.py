"""Weight-only int8: symmetric, one scale per output channel (row), applied to whole matrices.

A quantized matrix ``name`` [out, in] is stored as int8 ``name`` plus fp32 ``name.scale`` [out]
with ``W ≈ name * name.scale[:, None]``. Quantization always sees the *full* matrix (at import,
before any slicing), so a participant's row slice (q/k/v, gate/up) carries the rows' own
scales and a column slice (o, down: a partial sum of tensor parallelism) carries the full,
unchanged row scales. Every participant therefore holds exact pieces of one int8 model, and a
split computes what one device computes up to the order of fp32 sums.

Scales are rounded *up* to values that bfloat16 represents exactly: the fast decode kernel
(``_weight_int8pack_mm``) takes bf16 scales, and with representable scales the fp32 path and
the bf16 path multiply by the same number. Rounding up keeps ``|W / scale| <= 127``.

Biases and norms stay fp32; the embedding is quantized per row (a row is a token, which is
also an output channel of a tied lm_head).

Weight-only 4-bit (``q4``): a matrix [out, in] is cut into groups of ``Q4_GROUP`` = 32
consecutive input columns, each with its own step d and offset m; ``in`` must be a multiple of
32. ``W[r, 32g + i] ≈ d[r, g] · code + m[r, g]`` with codes 0..15: the group's minimum is m and
its maximum m + 15·d (an asymmetric grid, the arithmetic of ggml's Q4_1). Stored as uint8
``name`` [out, in/2] (two codes per byte: within a group's 16 bytes, byte i holds column i in
its low nibble and column i + 16 in its high nibble, which a vector kernel unpacks with one mask
and one shift) and ``name.scale`` [out, in/32, 2]: (d, m) as IEEE half floats, kept as their
int16 bit patterns so that no load-time dtype conversion (which touches floating tensors only)
rounds them. 20 bytes per 32 weights: 5 bits per weight (0.625 bytes, against int8's 1.007 at
K = 576). A model imported from a Q4_1 GGUF comes back with its own codes, steps and offsets
(the group's extremes are codes 0 and 15 there too). Quantization sees the full matrix, as
int8's does: a row slice takes its rows of both tensors, a column slice (``wo``, ``w_down``)
takes whole groups (its cut must fall on a multiple of 32), so every participant holds exact
pieces of one q4 model. The embedding and the LM head stay int8 (``Q4_KEEPS_INT8``).

Why not symmetric (code − 8)·d: on SmolLM2-135M (whose store copy comes from a Q4_1 GGUF) it
agreed with the fp32 model's greedy token on 121 of 192 teacher-forced decode steps; the
asymmetric grid reproduces those weights (README, quantization section).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from edgemesh.errors import ConfigError

if TYPE_CHECKING:
    from edgemesh.weights.config import ModelConfig
    from edgemesh.weights.progress import Progress
    from edgemesh.weights.store import ModelEntry, ModelStore

SCALE = ".scale"
SCHEMES = ("int8", "q4")
# store tensor names (see shard.py) that are weight matrices [out, in]
QUANTIZED = frozenset({"embed", "lm_head", "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"})
QMAX = 127
Q4_GROUP = 32  # input columns per q4 scale; column cuts of a q4 matrix fall on multiples of it
Q4_DTYPE = torch.uint8  # a q4 matrix's storage dtype (int8 matrices are torch.int8)
F16_MAX = 65504.0
# A q4 model keeps the embedding and the LM head (tied to it or not) in int8: the head decides
# every token, and SmolLM2's embedding (not on a 4-bit grid in its GGUF) lost 9 % of its norm
# to 4 bits, which cost more greedy agreement than the whole rest of the model (README).
Q4_KEEPS_INT8 = frozenset({"embed", "lm_head"})


def check_scheme(scheme: str | None) -> str | None:
    """``None``/"" (keep float) or a supported scheme; anything else is a user error."""
    if not scheme or scheme in ("none", "float32", "fp32"):
        return None
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown quantization {scheme!r} (supported: {', '.join(SCHEMES)})")
    return scheme


def _bf16_ceil(x: torch.Tensor) -> torch.Tensor:
    """Smallest bf16-representable value >= x, for x >= 0 (returned as fp32)."""
    b = x.to(torch.bfloat16).to(torch.float32)  # round-to-nearest: may be below x
    low = b < x
    if low.any():  # bump to the next bf16 value: +1 in the 16-bit pattern
        bits = b[low].to(torch.bfloat16).view(torch.int16) + 1
        b[low] = bits.view(torch.bfloat16).to(torch.float32)
    return b


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [out, in], fp32 scale [out]) with per-row absmax scaling; zero rows get scale 1."""
    if w.dim() != 2:
        raise ConfigError(f"int8 quantization needs a 2-D matrix, got shape {tuple(w.shape)}")
    wf = w.to(torch.float32)
    amax = wf.abs().amax(dim=1)
    if not torch.isfinite(amax).all():
        raise ConfigError("cannot quantize a matrix with inf/nan weights")
    scale = torch.where(amax > 0, _bf16_ceil(amax / QMAX), torch.ones_like(amax))
    q = torch.round(wf / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def check_fits(config: ModelConfig, scheme: str | None) -> None:
    """Refuse, before anything is written, a model whose matrices a scheme cannot hold: q4 needs
    every input width (hidden size, attention width, MLP width) to be a multiple of 32."""
    if scheme != "q4":
        return
    widths = {"hidden size": config.hidden_size, "attention width (heads × head_dim)":
              config.num_attention_heads * config.head_dim, "MLP width": config.intermediate_size}
    bad = [f"{what} {n}" for what, n in widths.items() if n % Q4_GROUP]
    if bad:
        raise ConfigError(f"q4 needs input widths that are a multiple of {Q4_GROUP}: {', '.join(bad)} "
                          "are not; use int8 for this model")


def split_unit(scheme: str | None) -> int:
    """Granularity of a column cut (MLP rows of a rank, ``w_down``'s columns) for a scheme."""
    return Q4_GROUP if scheme == "q4" else 1


def is_q4(t: torch.Tensor) -> bool:
    return t.dtype == Q4_DTYPE


def quantize_q4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes [out, in/2], int16 fp16 pairs (d, m) [out, in/32, 2]); see the module docstring."""
    if w.dim() != 2:
        raise ConfigError(f"q4 quantization needs a 2-D matrix, got shape {tuple(w.shape)}")
    out, k = w.shape
    if k % Q4_GROUP:
        raise ConfigError(f"q4 quantization needs an input width that is a multiple of {Q4_GROUP}, "
                          f"got a matrix of shape {tuple(w.shape)}; use int8 for this model")
    wf = w.to(torch.float32).reshape(out, k // Q4_GROUP, Q4_GROUP)
    if not torch.isfinite(wf).all():
        raise ConfigError("cannot quantize a matrix with inf/nan weights")
    lo, hi = wf.amin(dim=2), wf.amax(dim=2)
    if lo.numel() and max(-float(lo.min()), float(hi.max())) > F16_MAX:
        raise ConfigError(f"q4 keeps its steps and offsets in float16: weights beyond ±{F16_MAX:g} do not fit")
    m = lo.to(torch.float16)
    d = ((hi - m.float()) / 15).to(torch.float16)
    df, mf = d.float()[..., None], m.float()[..., None]
    q = torch.where(df > 0, torch.round((wf - mf) / torch.where(df > 0, df, 1.0)), 0.0).clamp_(0, 15)
    return pack_q4(q.reshape(out, k)), torch.stack([d, m], dim=-1).view(torch.int16).contiguous()


def q4_steps(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, m) of a q4 ``.scale`` tensor as fp32, each [out, in/32]."""
    f = scale.view(torch.float16).to(torch.float32)
    return f[..., 0], f[..., 1]


def pack_q4(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [out, in] (any integer dtype) → bytes [out, in/2] in the q4 nibble order."""
    out, k = codes.shape
    g = codes.to(torch.uint8).reshape(out, k // Q4_GROUP, 2, Q4_GROUP // 2)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(out, k // 2).contiguous()


def unpack_q4(packed: torch.Tensor) -> torch.Tensor:
    """Bytes [out, in/2] → codes 0..15 [out, in] as uint8 (the inverse of ``pack_q4``)."""
    out, half = packed.shape
    if half % (Q4_GROUP // 2):
        raise ConfigError(f"a q4 matrix has a multiple of {Q4_GROUP // 2} bytes per row, got {tuple(packed.shape)}")
    g = packed.reshape(out, half // (Q4_GROUP // 2), 1, Q4_GROUP // 2)
    return torch.cat([g & 0x0F, g >> 4], dim=2).reshape(out, half * 2)


def dequantize_q4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    out, half = packed.shape
    k = half * 2
    if scale.dtype != torch.int16 or scale.shape != (out, k // Q4_GROUP, 2):
        raise ConfigError(f"q4 matrix {tuple(packed.shape)} needs a scale of int16 pairs, shape "
                          f"{(out, k // Q4_GROUP, 2)}; got {scale.dtype} {tuple(scale.shape)}")
    d, m = q4_steps(scale)
    q = unpack_q4(packed).to(torch.float32).reshape(out, k // Q4_GROUP, Q4_GROUP)
    return (q * d[..., None] + m[..., None]).reshape(out, k).to(dtype)


def dequantize(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float matrix of an int8 or q4 matrix."""
    return dequantize_q4(t, scale, dtype) if is_q4(t) else dequantize_int8(t, scale, dtype)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


def quantize_block(tensors: dict[str, torch.Tensor], scheme: str | None) -> dict[str, torch.Tensor]:
    """A block's tensors with every weight matrix quantized (others unchanged)."""
    scheme = check_scheme(scheme)
    if scheme is None:
        return tensors
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name in QUANTIZED and t.is_floating_point():
            quantize = quantize_q4 if scheme == "q4" and name not in Q4_KEEPS_INT8 else quantize_int8
            out[name], out[name + SCALE] = quantize(t)
        else:
            out[name] = t
    return out


def dequantize_block(tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The float block an int8 or q4 block stands for (references and tests)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(SCALE):
            continue
        out[name] = dequantize(t, tensors[name + SCALE], dtype) if name + SCALE in tensors else t
    return out


def quantized_name(name: str, scheme: str | None) -> str:
    """Store name of the quantized variant: ``smollm2`` → ``smollm2-int8``."""
    return f"{name}-{scheme}" if scheme and not name.endswith(f"-{scheme}") else name


def quantize_entry(store: ModelStore, entry: ModelEntry, scheme: str, *, name: str | None = None,
                   progress: Progress | None = None) -> ModelEntry:
    """A quantized copy of a float model already in the store (block by block, hashes verified)."""
    scheme = check_scheme(scheme)  # type: ignore[assignment]
    if scheme is None:
        raise ConfigError(f"name a quantization to convert a stored model to (supported: {', '.join(SCHEMES)})")
    if entry.dtype == scheme:
        raise ConfigError(f"model {entry.name!r} is already {scheme}")
    if entry.dtype in SCHEMES:
        raise ConfigError(f"model {entry.name!r} is {entry.dtype}: quantize its float original instead "
                          "(requantizing a quantized model adds both errors)")
    check_fits(entry.config, scheme)
    writer = store.writer(name or quantized_name(entry.name, scheme), entry.config,
                          source=f"{entry.source} ({scheme} of {entry.name})", dtype=scheme)
    for key in ("tokenizer.json", "tokenizer_config.json"):
        if entry.has(key):
            writer.write_file(key, entry.path(key).read_bytes())
    blocks = entry.blocks
    for i, block in enumerate(blocks):
        writer.write_block(block, quantize_block(entry.load_block(block), scheme))
        if progress:
            progress(i + 1, len(blocks), block)
    writer.entry.extra = dict(entry.extra)
    return writer.finish()
