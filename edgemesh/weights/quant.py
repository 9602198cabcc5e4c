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
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from edgemesh.errors import ConfigError

if TYPE_CHECKING:
    from edgemesh.weights.progress import Progress
    from edgemesh.weights.store import ModelEntry, ModelStore

SCALE = ".scale"
SCHEMES = ("int8",)
# store tensor names (see shard.py) that are weight matrices [out, in]
QUANTIZED = frozenset({"embed", "lm_head", "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"})
QMAX = 127


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


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


def quantize_block(tensors: dict[str, torch.Tensor], scheme: str | None) -> dict[str, torch.Tensor]:
    """A block's tensors with every weight matrix quantized (others unchanged)."""
    if check_scheme(scheme) is None:
        return tensors
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name in QUANTIZED and t.dtype != torch.int8:
            out[name], out[name + SCALE] = quantize_int8(t)
        else:
            out[name] = t
    return out


def dequantize_block(tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The float block an int8 block stands for (references and tests)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(SCALE):
            continue
        out[name] = dequantize_int8(t, tensors[name + SCALE], dtype) if t.dtype == torch.int8 else t
    return out


def quantized_name(name: str, scheme: str | None) -> str:
    """Store name of the quantized variant: ``smollm2`` → ``smollm2-int8``."""
    return f"{name}-{scheme}" if scheme and not name.endswith(f"-{scheme}") else name


def quantize_entry(store: ModelStore, entry: ModelEntry, scheme: str, *, name: str | None = None,
                   progress: Progress | None = None) -> ModelEntry:
    """A quantized copy of a float model already in the store (block by block, hashes verified)."""
    scheme = check_scheme(scheme)  # type: ignore[assignment]
    if scheme is None:
        raise ConfigError("name a quantization to convert a stored model to (supported: int8)")
    if entry.dtype == scheme:
        raise ConfigError(f"model {entry.name!r} is already {scheme}")
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
