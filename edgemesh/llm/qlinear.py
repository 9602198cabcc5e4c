"""``y = x Wᵀ + b`` for a weight that may be fp32/bf16, int8 with per-row scales or q4 (4-bit
codes, a scale per 32 input columns; ``quant.py``).

q4 weights (uint8 storage): decode (≤ ``kernels.MAX_M`` rows, fp32 activations) with the
native kernel goes through ``kernels.q4_gemv`` (fp32 in and out; inside, x is rounded to int8
per group of 32 and the group sums are exact integers; the order of the fp32 part is fixed by
K, so a rank's rows are bitwise one device's). A prefill (more rows) with the native library
goes through ``kernels.q4_linear``: blocks of rows dequantized into a cache-resident buffer
(bitwise ``dequantize_q4``) and ``F.linear`` on each, unrounded activations; a whole-model
SmolLM2 prefill of 256 tokens took ~0.7 of the time of the torch path below (README). Without
the native library the matrix is dequantized to fp32 by torch ops and ``F.linear`` called
on it. The products of a block and of the whole matrix agree to fp32 rounding, not bitwise
(torch's gemm blocks its sums by the output width).

Float weights go straight to ``F.linear``: the fp32 model is untouched. For int8 weights:

- decode (≤ ``kernels.MAX_M`` rows, fp32 activations), when the native kernel could be built
  (``edgemesh/kernels``): ``kernels.int8_gemv``, int8 rows widened to fp32 and multiplied in
  fp32 with an fp32 output, for every matrix (row- and column-parallel alike, and the head).
  It reads the int8 bytes once, and its summation order depends only on the input width, so a
  rank's rows are bitwise what one device computes for them and split decode equals one device
  to fp32 summation order (no bf16 rounding anywhere).

Without the native kernel (no C compiler, ``EDGEMESH_NATIVE=0``) the torch kernels below are
used, chosen by what was fastest *and* correct on a 2-core AVX2 CPU with torch 2.13
(cold-cache measurements in the README's quantization section):

- decode (≤ ``PACKED_MAX_ROWS`` rows) of a row-parallel matrix (q/k/v, gate/up, lm_head):
  ``aten._weight_int8pack_mm`` with bf16 activations and scales, fp32 accumulation. Its output
  is rounded to bf16, but each output element depends only on the full input and its own row,
  so any row split gives bitwise the same values as one device.
- the column-parallel matrices ``wo``/``w_down`` produce *partial sums* that the allreduce adds;
  a bf16-rounded partial would make a split differ from one device by bf16 noise, so they keep
  an fp32 output: dequantize on the fly, ``F.linear(x, q.float()) * scale``.
- prefill (more rows): dequantize on the fly; the packed kernel loses beyond a few rows. An
  overlapped prefill (two chunks) converts each block once instead (``widened``): the same
  float matrix and the same order of operations, so the same product for the same rows.
- the packed kernel is used only when the input width is a multiple of ``PACKED_K_MULTIPLE``:
  with other widths (e.g. K = 36) torch 2.13 returned wrong values and crashed for 2-4 rows.
  Row-parallel matrices always see the full hidden size, so this is a property of the model
  (SmolLM2: 576 = 18·32), the same on every rank.

Cost of the bf16 activations: fp32-order noise (~1e-7) from a split's allreduce can tip a value
across a bf16 rounding boundary, so split decode steps are equal to one device only to about the
kernel's own bf16 error, not to 1e-5 (the bars are in tests/unit/test_int8.py).

Alignment: the packed kernel segfaults on AVX-512/AMX CPUs when its int8 weight does not start on
a 64-byte boundary. Loaders align weights once (``weights/aligned.py``, ``InMemoryProvider``);
here every operand is checked again (a pointer test) and copied only if a caller bypassed them.

``_int_mm`` with dynamically quantized activations was slower here and its per-tensor activation
scale depends on the slice a rank holds, so it is not used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgemesh import kernels
from edgemesh.errors import ConfigError
from edgemesh.weights.aligned import aligned
from edgemesh.weights.quant import SCALE, dequantize_q4, is_q4

PACKED_MAX_ROWS = 4
PACKED_K_MULTIPLE = 32  # checked for K = 32..2048, 1..4 rows, 1..576 output rows (tests/unit/test_int8.py)
_packed_mm = torch.ops.aten._weight_int8pack_mm  # [M, K] bf16 × int8 [N, K] × bf16 scale [N] → bf16
PARTIAL_SUMS = frozenset({"wo", "w_down"})  # column-sliced: outputs are summed across ranks
REFINE_TOP = 16  # lm_head leaders recomputed in fp32 after the packed kernel


def linear(x: torch.Tensor, w: dict[str, torch.Tensor], name: str, bias: torch.Tensor | None = None) -> torch.Tensor:
    weight = w[name]
    if is_q4(weight):
        return _q4_linear(x, weight, w[name + SCALE], bias)
    scale = w.get(name + SCALE)
    if weight.dtype != torch.int8:
        if scale is None:
            return F.linear(x, weight, bias)
        y = F.linear(x, weight) * scale.to(x.dtype)  # int8 values widened once (``widened``)
        return y + bias if bias is not None else y
    assert scale is not None
    rows = x.numel() // x.shape[-1]
    if _native_used(x, weight):
        y = kernels.int8_gemv(x.reshape(rows, x.shape[-1]), weight, scale).reshape(*x.shape[:-1], weight.shape[0])
    elif _packed_used(x, w, name):
        y = _packed_mm(
            aligned(x.reshape(rows, x.shape[-1]).to(torch.bfloat16)), aligned(weight), aligned(scale.to(torch.bfloat16))
        ).to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
    else:
        y = F.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)
    return y + bias if bias is not None else y


def _q4_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if x.shape[-1] != 2 * weight.shape[1]:
        raise ConfigError(f"q4 matrix of {2 * weight.shape[1]} input columns applied to an input of "
                          f"width {x.shape[-1]}")
    if _q4_native(x, weight):  # decode-size: int8-rounded activations; prefill: blocks, unrounded
        product = kernels.q4_gemv if rows <= kernels.MAX_M else kernels.q4_linear
        y = product(x.reshape(rows, x.shape[-1]), weight, scale).reshape(*x.shape[:-1], weight.shape[0])
    else:
        y = F.linear(x, dequantize_q4(weight, scale, x.dtype))
    return y + bias if bias is not None else y


def _native_used(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.dtype == torch.float32 and 1 <= x.numel() // x.shape[-1] <= kernels.MAX_M and weight.shape[0] > 0
            and kernels.native() is not None)


def _q4_native(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A q4 product through the native library (``q4_gemv`` or ``q4_linear``): fp32 activations."""
    return (x.dtype == torch.float32 and x.numel() > 0 and weight.shape[0] > 0 and x.shape[-1] % 32 == 0
            and kernels.native() is not None)


def _packed_used(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> bool:
    weight = w[name]
    return (weight.dtype == torch.int8 and x.numel() // x.shape[-1] <= PACKED_MAX_ROWS and name not in PARTIAL_SUMS
            and weight.shape[0] > 0 and weight.shape[1] % PACKED_K_MULTIPLE == 0)


def embedding(tokens: torch.Tensor, w: dict[str, torch.Tensor], name: str, dtype: torch.dtype) -> torch.Tensor:
    """Rows of an embedding matrix (int8 rows are scaled back to ``dtype``)."""
    table = w[name]
    rows = F.embedding(tokens, table)
    if is_q4(table):  # only the looked-up rows are dequantized
        flat = rows.reshape(-1, rows.shape[-1])
        scale = w[name + SCALE][tokens.reshape(-1)]
        return dequantize_q4(flat, scale, dtype).reshape(*tokens.shape, -1)
    if table.dtype != torch.int8:
        return rows.to(dtype)
    return rows.to(dtype) * w[name + SCALE][tokens].to(dtype)[..., None]


def lm_head(h: torch.Tensor, w: dict[str, torch.Tensor], name: str, refine: int = REFINE_TOP) -> torch.Tensor:
    """Logits; for int8 decode the ``refine`` largest are recomputed with an fp32 output.

    The packed kernel rounds logits to bf16 (a step of 0.125 at |logit| 16–32), enough to
    reorder near-tied leaders: greedy decoding would then follow rounding, not the model. The
    leaders by the rounded logits are recomputed exactly (fp32 dot products of their int8 rows),
    which costs ``refine`` rows instead of the whole vocabulary.
    """
    logits = linear(h, w, name)
    weight = w[name]
    if refine <= 0 or _native_used(h, weight) or not _packed_used(h, w, name):
        return logits
    flat_h = h.reshape(-1, h.shape[-1])
    flat = logits.view(-1, logits.shape[-1])
    top = flat.topk(min(refine, flat.shape[-1]), dim=-1).indices  # [rows, refine]
    rows = weight[top].to(h.dtype) * w[name + SCALE][top].to(h.dtype)[..., None]  # [rows, refine, K]
    flat.scatter_(-1, top, (rows @ flat_h[:, :, None]).squeeze(-1))
    return logits


def widened(w: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
            max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """A block's weights for several prefill-size products in a row (the overlapped prefill's
    chunks, ``Participant._overlapped_layers``): each quantized matrix converted once instead
    of once per product, with the values and the order of operations of the per-product path,
    so every output is bitwise what ``linear`` gives on the quantized dict for the same input:
    a q4 matrix dequantized, with a scale of ones (``F.linear`` then ``* 1`` and ``+ bias``,
    as the q4 path adds its bias after the product: a fused bias rounds differently); an int8
    matrix widened to ``dtype`` with its row scales kept for after the product, as that path
    applies them. Float matrices are shared, not copied, and so are q4 matrices where
    ``kernels.q4_linear`` takes them (fp32, native library): it dequantizes a block of rows at a
    time into cache, which costs less than reading a converted matrix from memory.
    ``max_bytes``: if the converted matrices would take more, ``w`` itself (each product
    converts its own matrix then: one at a time in memory, as without chunks)."""
    blocks = dtype == torch.float32 and kernels.native() is not None  # q4 goes by kernels.q4_linear
    wide = [name for name, t in w.items()
            if (is_q4(t) and not blocks) or (t.dtype == torch.int8 and name + SCALE in w)]
    size = sum(w[name].shape[0] * (2 * w[name].shape[1] if is_q4(w[name]) else w[name].shape[1]) for name in wide)
    if max_bytes is not None and size * dtype.itemsize > max_bytes:
        return w
    out = dict(w)
    for name in wide:
        t = w[name]
        if is_q4(t):
            out[name] = dequantize_q4(t, w[name + SCALE], dtype)
            out[name + SCALE] = torch.ones(t.shape[0], dtype=dtype)
        else:
            out[name] = t.to(dtype)
    return out
