"""``y = x Wᵀ + b`` for a weight that may be fp32/bf16 or int8 with per-row scales (``quant.py``).

Float weights go straight to ``F.linear``: the fp32 model is untouched. For int8 weights the
kernel is chosen by what was fastest *and* correct on a 2-core AVX2 CPU with torch 2.13
(cold-cache measurements in the README's quantization section):

- decode (≤ ``PACKED_MAX_ROWS`` rows) of a row-parallel matrix (q/k/v, gate/up, lm_head):
  ``aten._weight_int8pack_mm`` with bf16 activations and scales, fp32 accumulation. Its output
  is rounded to bf16, but each output element depends only on the full input and its own row,
  so any row split gives bitwise the same values as one device.
- the column-parallel matrices ``wo``/``w_down`` produce *partial sums* that the allreduce adds;
  a bf16-rounded partial would make a split differ from one device by bf16 noise, so they keep
  an fp32 output: dequantize on the fly, ``F.linear(x, q.float()) * scale``.
- prefill (more rows): dequantize on the fly; the packed kernel loses beyond a few rows.
- the packed kernel is used only when the input width is a multiple of ``PACKED_K_MULTIPLE``:
  with other widths (e.g. K = 36) torch 2.13 returned wrong values and crashed for 2-4 rows.
  Row-parallel matrices always see the full hidden size, so this is a property of the model
  (SmolLM2: 576 = 18·32), the same on every rank.

``_int_mm`` with dynamically quantized activations was slower here and its per-tensor activation
scale depends on the slice a rank holds, so it is not used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgemesh.weights.quant import SCALE

PACKED_MAX_ROWS = 4
PACKED_K_MULTIPLE = 32  # checked for K = 32..2048, 1..4 rows, 1..576 output rows (tests/unit/test_int8.py)
_packed_mm = torch.ops.aten._weight_int8pack_mm  # [M, K] bf16 × int8 [N, K] × bf16 scale [N] → bf16
PARTIAL_SUMS = frozenset({"wo", "w_down"})  # column-sliced: outputs are summed across ranks


def linear(x: torch.Tensor, w: dict[str, torch.Tensor], name: str, bias: torch.Tensor | None = None) -> torch.Tensor:
    weight = w[name]
    if weight.dtype != torch.int8:
        return F.linear(x, weight, bias)
    scale = w[name + SCALE]
    rows = x.numel() // x.shape[-1]
    if (rows <= PACKED_MAX_ROWS and name not in PARTIAL_SUMS and weight.shape[0] > 0
            and weight.shape[1] % PACKED_K_MULTIPLE == 0):
        y = _packed_mm(
            x.reshape(rows, x.shape[-1]).to(torch.bfloat16), weight, scale.to(torch.bfloat16)
        ).to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
    else:
        y = F.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)
    return y + bias if bias is not None else y


def embedding(tokens: torch.Tensor, w: dict[str, torch.Tensor], name: str, dtype: torch.dtype) -> torch.Tensor:
    """Rows of an embedding matrix (int8 rows are scaled back to ``dtype``)."""
    table = w[name]
    rows = F.embedding(tokens, table)
    if table.dtype != torch.int8:
        return rows.to(dtype)
    return rows.to(dtype) * w[name + SCALE][tokens].to(dtype)[..., None]
