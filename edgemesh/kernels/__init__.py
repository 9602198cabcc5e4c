"""Small native kernels, compiled on first use for the CPU they run on.

PyTorch 2.13 has no fast CPU kernel for a decode-size product with a weight-only int8 matrix
and fp32 activations: ``_weight_int8pack_mm`` takes bf16 activations (and rounds its output to
bf16), and dequantizing to fp32 first reads 5x the bytes. ``int8_gemv.c`` is that kernel
(AVX2/FMA, or plain C elsewhere), about 100 lines, built with the system C compiler and
``-march=native`` into the user's cache directory, keyed by the source, the compiler and the
CPU's flags (a different machine gets its own build). No compiler, or a build that fails: the
callers keep their torch paths; ``EDGEMESH_NATIVE=0`` forces that (benchmarks compare both).

The same library holds the q4 kernel (4-bit codes in groups of 32 input columns with an fp32
scale each, ``weights/quant.py``), the fused decode blocks for both formats, and the decode
step's layer loop (``decode_layers``), whose allreduce is a callback given by the caller. The
build itself is ``edgemesh.cbuild``.

Only our own source is compiled, from the installed package; nothing from the network.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from edgemesh.cbuild import compile_library

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("int8_gemv.c")
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
MAX_M = 4


def _build(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    lib = compile_library(_SOURCE, "int8_gemv", ["-O3", "-march=native", *extra_flags, "-ffp-contract=off", "-pthread"])
    if lib is None:
        return None
    fn = lib.edgemesh_int8_gemv
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_size_t] * 5
    vp, sz, f32 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_float
    lib.edgemesh_int8_attn_decode.restype = ctypes.c_int
    lib.edgemesh_int8_attn_decode.argtypes = [vp, vp, f32, sz] + [vp] * 8 + [sz] * 3 + [vp] * 4 + [sz] * 2 + [vp] * 2
    lib.edgemesh_int8_mlp_decode.restype = ctypes.c_int
    lib.edgemesh_int8_mlp_decode.argtypes = [vp, vp, f32, sz] + [vp] * 6 + [sz, vp, vp]
    lib.edgemesh_q4_gemv.restype = ctypes.c_int
    lib.edgemesh_q4_gemv.argtypes = [vp] * 4 + [sz] * 5 + [ctypes.c_int]
    lib.edgemesh_q4_attn_decode.restype = ctypes.c_int
    lib.edgemesh_q4_attn_decode.argtypes = lib.edgemesh_int8_attn_decode.argtypes
    lib.edgemesh_q4_mlp_decode.restype = ctypes.c_int
    lib.edgemesh_q4_mlp_decode.argtypes = lib.edgemesh_int8_mlp_decode.argtypes
    lib.edgemesh_q4_dequant.restype = ctypes.c_int
    lib.edgemesh_q4_dequant.argtypes = [vp] * 3 + [sz] * 4
    lib.edgemesh_pool_threads.restype = ctypes.c_int
    lib.edgemesh_pool_threads.argtypes = [ctypes.c_int]
    i64, ci = ctypes.c_int64, ctypes.c_int
    lib.edgemesh_decode_layers.restype = ci
    lib.edgemesh_decode_layers.argtypes = [vp, ci, ci, vp, i64, f32, i64, vp, vp, i64, i64, vp, vp, vp, vp, vp,
                                           ctypes.POINTER(ci)]
    if lib.edgemesh_int8_gemv_max_m() != MAX_M:
        log.warning("int8 decode kernel: unexpected build (%s); using torch's kernels", lib._name)
        return None
    return lib


def native() -> ctypes.CDLL | None:
    """The built kernel library, or None (disabled, no compiler, build failed)."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if os.environ.get("EDGEMESH_NATIVE", "1") not in ("0", "false", "no"):
                try:
                    _lib = _build()
                except OSError as exc:
                    log.warning("int8 decode kernel unavailable (%s); using torch's kernels", exc)
                    _lib = None
            _tried = True
    return _lib


_pool_size: dict[int, int] = {}  # id(lib) → threads its pool has


def _threads(lib: ctypes.CDLL) -> None:
    """Size ``lib``'s pool to the calling thread's torch thread budget (the rank's threads, see
    ``runtime.cpu``; ``EDGEMESH_KERNEL_THREADS`` overrides). A ctypes call only when it changes."""
    want = _env_threads or torch.get_num_threads()
    if _pool_size.get(id(lib)) != want:
        _pool_size[id(lib)] = lib.edgemesh_pool_threads(want)


def _read_env_threads() -> int:
    raw = os.environ.get("EDGEMESH_KERNEL_THREADS", "").strip()
    try:
        return max(0, int(raw)) if raw else 0
    except ValueError:
        log.warning("EDGEMESH_KERNEL_THREADS=%r is not a number; using the torch thread count", raw)
        return 0


_env_threads = _read_env_threads()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_pool_size.clear)  # a forked child's pool has 1 thread


def pool_threads() -> int:
    """Threads the native kernels use now (1 without the native library)."""
    lib = native()
    return int(lib.edgemesh_pool_size()) if lib is not None else 1


def vectorized() -> bool:
    lib = native()
    return bool(lib is not None and lib.edgemesh_int8_gemv_vector())


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(x @ weight.T) * scale`` for fp32 ``x`` [m, k] (1 ≤ m ≤ MAX_M), int8 ``weight`` [n, k],
    fp32 ``scale`` [n]; fp32 [m, n], on the calling thread (the GIL is released meanwhile).
    The caller checks ``native()`` first."""
    lib = _lib
    assert lib is not None
    m, k = x.shape
    n = weight.shape[0]
    if not 1 <= m <= MAX_M or weight.shape[1] != k or scale.shape != (n,):
        raise ValueError(f"int8_gemv: shapes x {tuple(x.shape)}, weight {tuple(weight.shape)}, scale {tuple(scale.shape)}")
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.to(torch.float32).contiguous()
    if not weight.is_contiguous():
        weight = weight.contiguous()
    if scale.dtype != torch.float32 or not scale.is_contiguous():
        scale = scale.to(torch.float32).contiguous()
    y = torch.empty((m, n), dtype=torch.float32)
    _threads(lib)
    lib.edgemesh_int8_gemv(x.data_ptr(), weight.data_ptr(), scale.data_ptr(), y.data_ptr(), m, n, k, 0, n)
    return y


def build_variant(*extra_flags: str) -> ctypes.CDLL | None:
    """A separate build with extra compiler flags (e.g. ``-mno-avx512f`` for the AVX2 path), for
    tests and benchmarks that compare code paths on one machine; None without a compiler."""
    return _build(tuple(extra_flags))


def q4_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *, plain: bool = False,
            lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """``x @ W.T`` for fp32 ``x`` [m, k] (1 ≤ m ≤ MAX_M) and a q4 matrix: uint8 ``weight``
    [n, k/2], int16 ``scale`` [n, k/32, 2] (fp16 steps and offsets, ``weights/quant.py``);
    fp32 [m, n], with x rounded to int8 per group of 32 inside (see ``int8_gemv.c``).
    ``plain``: the plain-C arithmetic whatever the build (tests); ``lib``: another build
    (``build_variant``). The caller checks ``native()`` first; bad shapes raise ``ValueError``."""
    lib = lib or _lib
    assert lib is not None
    m, k = x.shape
    n = weight.shape[0]
    if (not 1 <= m <= MAX_M or k % 32 or weight.dtype != torch.uint8 or tuple(weight.shape) != (n, k // 2)
            or tuple(scale.shape) != (n, k // 32, 2) or scale.dtype != torch.int16):
        raise ValueError(f"q4_gemv: shapes x {tuple(x.shape)}, weight {tuple(weight.shape)} {weight.dtype}, "
                         f"scale {tuple(scale.shape)}")
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.to(torch.float32).contiguous()
    weight, scale = weight.contiguous(), scale.contiguous()
    y = torch.empty((m, n), dtype=torch.float32)
    if n:
        _threads(lib)
        lib.edgemesh_q4_gemv(x.data_ptr(), weight.data_ptr(), scale.data_ptr(), y.data_ptr(), m, n, k, 0, n,
                             int(plain))
    return y


# Bytes of fp32 weight rows dequantized at a time by ``q4_linear``: well inside a core's L2
# (2 MB on the machines measured), so the product reads them from cache.
Q4_BLOCK_BYTES = 512 << 10
_buffers = threading.local()


def q4_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` for fp32 ``x`` [m, k] of any number of rows (prefill) and a q4 matrix (see
    ``q4_gemv``), with unrounded activations: blocks of ``Q4_BLOCK_BYTES`` of W's rows are
    dequantized (``edgemesh_q4_dequant``, bitwise ``quant.dequantize_q4``) into a buffer kept
    per thread and multiplied there by ``F.linear``. The caller checks ``native()`` first."""
    lib = _lib
    assert lib is not None
    m, k = x.shape
    n = weight.shape[0]
    if (k % 32 or weight.dtype != torch.uint8 or tuple(weight.shape) != (n, k // 2)
            or tuple(scale.shape) != (n, k // 32, 2) or scale.dtype != torch.int16):
        raise ValueError(f"q4_linear: shapes x {tuple(x.shape)}, weight {tuple(weight.shape)} {weight.dtype}, "
                         f"scale {tuple(scale.shape)}")
    if n == 0:
        return x.new_empty((m, 0))
    weight, scale = weight.contiguous(), scale.contiguous()
    rows = max(64, Q4_BLOCK_BYTES // (4 * k) // 64 * 64)
    buf = getattr(_buffers, "q4", None)
    if buf is None or buf.numel() < rows * k:
        buf = _buffers.q4 = torch.empty(rows * k, dtype=torch.float32)
    parts = []
    for a in range(0, n, rows):
        b = min(n, a + rows)
        block = buf[:(b - a) * k].view(b - a, k)
        if lib.edgemesh_q4_dequant(weight.data_ptr(), scale.data_ptr(), block.data_ptr(), n, k, a, b):
            raise ValueError(f"q4_linear: rows {a}..{b} of {n}, width {k}")
        parts.append(torch.nn.functional.linear(x, block))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


@contextlib.contextmanager
def torch_only() -> Iterator[None]:
    """Within this block ``native()`` is None: the torch kernels run (benchmarks and tests
    compare the two paths in one process)."""
    global _lib, _tried
    native()
    with _lock:
        saved = _lib, _tried
        _lib, _tried = None, True
    try:
        yield
    finally:
        with _lock:
            _lib, _tried = saved


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _ready(*ts: torch.Tensor) -> bool:
    return all(t.is_contiguous() for t in ts)


def _format(w: dict[str, torch.Tensor], names: tuple[str, ...]) -> str | None:
    """"int8" or "q4" when every matrix of a block is in that format (with its scale), else None."""
    dtypes = {w[n].dtype for n in names}
    if len(dtypes) != 1 or any(n + ".scale" not in w for n in names):
        return None
    return {torch.int8: "int8", torch.uint8: "q4"}.get(dtypes.pop())


_SCALE_DTYPE = {"int8": torch.float32, "q4": torch.int16}  # q4: fp16 (step, offset) bit patterns


def _want(fmt: str, shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, ...]]:
    """Shapes of a block's matrices and scales as stored in ``fmt``, from their [out, in]."""
    out: dict[str, tuple[int, ...]] = {}
    for name, (n, k) in shapes.items():
        out[name] = (n, k // 2) if fmt == "q4" else (n, k)
        out[name + ".scale"] = (n, k // 32, 2) if fmt == "q4" else (n,)
    return out


# Weight checks of the block calls, per weight dict: a decode step calls each block once per
# layer with the same dict, and checking ~20 tensors from Python took ~20 us a call (1.2 ms a
# token on SmolLM2). An entry is used only while the dict still holds the very tensors it was
# checked with: its names and the ids of its values must be the same, and an entry is dropped as soon as one
# of its tensors is freed (a weak reference's callback), so an id cannot have been reused by
# another tensor meanwhile. A released block is not kept alive. None results are kept too.
_checked: dict[int, tuple[Any, ...]] = {}
_CHECKED_MAX = 4096


def _checked_weights(w: dict[str, torch.Tensor], key: tuple[Any, ...], check: Callable[[], Any]) -> Any:
    hit = _checked.get(id(w))
    if hit is not None and hit[0] == key and hit[1] == tuple(map(id, w.values())) and hit[5] == tuple(w):
        return hit[3]
    info = check()
    if len(_checked) >= _CHECKED_MAX:
        _checked.clear()
    token = object()
    slot = id(w)

    def forget(_: object) -> None:
        entry = _checked.get(slot)
        if entry is not None and entry[4] is token:
            del _checked[slot]

    refs = tuple(weakref.ref(t, forget) for t in w.values())
    _checked[slot] = (key, tuple(map(id, w.values())), refs, info, token, tuple(w))
    return info


def _attention_weights(w: dict[str, torch.Tensor], hdim: int, head_dim: int) -> tuple[Any, ...] | None:
    """(C function, n_q, n_kv, weight pointers) when the block's weights suit the C code."""
    lib = _lib
    names = ("wq", "wk", "wv", "wo")
    if lib is None or any(n not in w for n in (*names, "norm")):
        return None
    fmt = _format(w, names)
    if fmt is None or any(b in w for b in ("bq", "bk", "bv", "bo")) or head_dim <= 0 or head_dim % 2:
        return None
    n_q, n_kv = w["wq"].shape[0] // head_dim, w["wk"].shape[0] // head_dim
    qd, kd = n_q * head_dim, n_kv * head_dim
    if n_kv == 0 or n_q % n_kv or (fmt == "q4" and (hdim % 32 or qd % 32)):
        return None
    want = {"norm": (hdim,), **_want(fmt, {"wq": (qd, hdim), "wk": (kd, hdim), "wv": (kd, hdim), "wo": (hdim, qd)})}
    # The C code trusts these sizes: anything else (a malformed slice) takes the torch path,
    # which raises its own shape error.
    if any(tuple(w[n].shape) != shape for n, shape in want.items()):
        return None
    mats = [w[n] for n in names] + [w[n + ".scale"] for n in names]
    if (not _ready(*mats, w["norm"]) or any(t.dtype != _SCALE_DTYPE[fmt] for t in mats[4:])
            or w["norm"].dtype != torch.float32):
        return None
    call = lib.edgemesh_q4_attn_decode if fmt == "q4" else lib.edgemesh_int8_attn_decode
    ptrs = (_ptr(w["wq"]), _ptr(w["wq.scale"]), _ptr(w["wk"]), _ptr(w["wk.scale"]), _ptr(w["wv"]),
            _ptr(w["wv.scale"]), _ptr(w["wo"]), _ptr(w["wo.scale"]))
    return call, n_q, n_kv, _ptr(w["norm"]), ptrs


def attention_decode(x: torch.Tensor, w: dict[str, torch.Tensor], k_cache: torch.Tensor, v_cache: torch.Tensor,
                     pos: int, cos: torch.Tensor, sin: torch.Tensor, eps: float, head_dim: int) -> torch.Tensor | None:
    """A rank's whole attention block for one token (batch 1, int8 or q4 weights, no biases) in
    one native call: its partial output [1, 1, H], or None where it does not apply (the caller
    runs the torch ops instead). ``k_cache``/``v_cache``: [1, n_kv, max_seq, d] fp32."""
    if x.dtype != torch.float32 or x.numel() != x.shape[-1] or native() is None:
        return None
    hdim = x.shape[-1]
    info = _checked_weights(w, (_lib, hdim, head_dim), lambda: _attention_weights(w, hdim, head_dim))
    if info is None:
        return None
    call, n_q, n_kv, norm, ptrs = info
    max_seq = k_cache.shape[2]
    if (tuple(k_cache.shape) != (1, n_kv, max_seq, head_dim) or k_cache.shape != v_cache.shape
            or not 0 <= pos < max_seq or tuple(cos.shape) != (1, head_dim) or cos.shape != sin.shape
            or not _ready(x, cos, sin, k_cache, v_cache)
            or any(t.dtype != torch.float32 for t in (cos, sin, k_cache, v_cache))):
        return None
    out = torch.empty((1, 1, hdim), dtype=torch.float32)
    scratch = torch.empty(hdim + 2 * (n_q + n_kv) * head_dim + n_q * (pos + 1), dtype=torch.float32)
    _threads(_lib)
    rc = call(_ptr(x), norm, ctypes.c_float(eps), hdim, *ptrs, n_q, n_kv, head_dim, _ptr(cos), _ptr(sin),
              _ptr(k_cache), _ptr(v_cache), max_seq, pos, _ptr(scratch), _ptr(out))
    if rc != 0:
        raise ValueError(f"attention_decode: bad shapes (heads {n_q}/{n_kv}, d {head_dim}, pos {pos}/{max_seq})")
    return out


def _mlp_weights(w: dict[str, torch.Tensor], hdim: int) -> tuple[Any, ...] | None:
    lib = _lib
    names = ("w_gate", "w_up", "w_down")
    if lib is None or any(n not in w for n in (*names, "norm")):
        return None
    fmt = _format(w, names)
    if fmt is None or any(b in w for b in ("b_gate", "b_up", "b_down")):
        return None
    mats = [w[n] for n in names] + [w[n + ".scale"] for n in names]
    if (not _ready(*mats, w["norm"]) or any(t.dtype != _SCALE_DTYPE[fmt] for t in mats[3:])
            or w["norm"].dtype != torch.float32):
        return None
    f = w["w_gate"].shape[0]
    if fmt == "q4" and (hdim % 32 or f % 32):
        return None
    want = {"norm": (hdim,), **_want(fmt, {"w_gate": (f, hdim), "w_up": (f, hdim), "w_down": (hdim, f)})}
    if any(tuple(w[n].shape) != shape for n, shape in want.items()):
        return None  # the C code trusts these sizes; the torch path raises its own error
    call = lib.edgemesh_q4_mlp_decode if fmt == "q4" else lib.edgemesh_int8_mlp_decode
    ptrs = (_ptr(w["w_gate"]), _ptr(w["w_gate.scale"]), _ptr(w["w_up"]), _ptr(w["w_up.scale"]),
            _ptr(w["w_down"]), _ptr(w["w_down.scale"]))
    return call, f, _ptr(w["norm"]), ptrs


def mlp_decode(x: torch.Tensor, w: dict[str, torch.Tensor], eps: float) -> torch.Tensor | None:
    """A rank's whole SwiGLU block for one token (int8 or q4 weights, no biases) in one native
    call: its partial output [1, 1, H], or None where it does not apply."""
    if x.dtype != torch.float32 or x.numel() != x.shape[-1] or native() is None or not x.is_contiguous():
        return None
    hdim = x.shape[-1]
    info = _checked_weights(w, (_lib, hdim), lambda: _mlp_weights(w, hdim))
    if info is None:
        return None
    call, f, norm, ptrs = info
    out = torch.empty((1, 1, hdim), dtype=torch.float32)
    scratch = torch.empty(hdim + 2 * f, dtype=torch.float32)
    _threads(_lib)
    rc = call(_ptr(x), norm, ctypes.c_float(eps), hdim, *ptrs, f, _ptr(scratch), _ptr(out))
    if rc != 0:
        raise ValueError(f"mlp_decode: bad shapes (hidden {hdim}, rows {f})")
    return out


class Layer(ctypes.Structure):
    """``em_layer``: one decoder layer's two blocks as the native decode loop takes them."""

    _fields_ = [("att_fmt", ctypes.c_int), ("mlp_fmt", ctypes.c_int), ("att_norm", ctypes.c_void_p),
                *[(n, ctypes.c_void_p) for n in ("wq", "sq", "wk", "sk", "wv", "sv", "wo", "so")],
                ("n_q", ctypes.c_int64), ("n_kv", ctypes.c_int64), ("kcache", ctypes.c_void_p),
                ("vcache", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p),
                *[(n, ctypes.c_void_p) for n in ("wg", "sg", "wu", "su", "wd", "sd")], ("f", ctypes.c_int64)]


def _empty(w: dict[str, torch.Tensor], rows: str, bias: str) -> bool:
    """A block of no rows here and no bias to add: its partial output is zeros."""
    t = w.get(rows)
    return t is not None and t.shape[0] == 0 and bias not in w


class LayerTable:
    """Every decoder layer of a rank for the native decode loop: the C descriptions and what
    they point into (kept alive here), plus the scratch the largest block needs."""

    def __init__(self, layers: Any, keep: list[Any], hdim: int, head_dim: int, max_seq: int, scratch: int) -> None:
        self.layers, self.keep = layers, keep
        self.hdim, self.head_dim, self.max_seq = hdim, head_dim, max_seq
        self.scratch = torch.empty(scratch, dtype=torch.float32)
        self.part = torch.empty(hdim, dtype=torch.float32)
        self.sum = torch.empty(hdim, dtype=torch.float32)
        self.blocks = 2 * len(layers)


def layer_table(blocks: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor, torch.Tensor]],
                hdim: int, head_dim: int) -> LayerTable | None:
    """The native decode loop's table for layers given as (attention weights, MLP weights, K
    cache, V cache); None unless every block suits the C code (the same checks as
    ``attention_decode`` and ``mlp_decode``, whose paths the Python loop keeps)."""
    lib = native()
    if lib is None or not blocks:
        return None
    arr = (Layer * len(blocks))()
    keep: list[Any] = []
    max_seq = blocks[0][2].shape[2]
    need = 0
    for i, (wa, wm, kc, vc) in enumerate(blocks):
        L = arr[i]
        # A block with no heads (no rows) of this layer here adds zeros, as ``attention_block``
        # (``mlp_block``) does: n_q (f) 0 tells the C loop (a plan can leave a rank out of a
        # layer's attention: its KV groups are coarse).
        n_q = n_kv = f = 0
        if not _empty(wa, "wk", "bo"):
            att = _checked_weights(wa, (lib, hdim, head_dim), lambda: _attention_weights(wa, hdim, head_dim))
            if att is None:
                return None
            call, n_q, n_kv, norm, ptrs = att
            if (tuple(kc.shape) != (1, n_kv, max_seq, head_dim) or kc.shape != vc.shape or not _ready(kc, vc)
                    or kc.dtype != torch.float32 or vc.dtype != torch.float32):
                return None
            L.att_fmt = 1 if call is lib.edgemesh_q4_attn_decode else 0
            L.att_norm = norm
            L.wq, L.sq, L.wk, L.sk, L.wv, L.sv, L.wo, L.so = ptrs
            L.n_q, L.n_kv, L.kcache, L.vcache = n_q, n_kv, _ptr(kc), _ptr(vc)
        if not _empty(wm, "w_gate", "b_down"):
            mlp = _checked_weights(wm, (lib, hdim), lambda: _mlp_weights(wm, hdim))
            if mlp is None:
                return None
            call, f, norm, ptrs = mlp
            L.mlp_fmt = 1 if call is lib.edgemesh_q4_mlp_decode else 0
            L.mlp_norm = norm
            L.wg, L.sg, L.wu, L.su, L.wd, L.sd = ptrs
            L.f = f
        keep += [wa, wm, (kc, vc)]
        need = max(need, hdim + 2 * (n_q + n_kv) * head_dim + n_q * max_seq, hdim + 2 * f)
    return LayerTable(arr, keep, hdim, head_dim, max_seq, need)


def decode_layers(table: LayerTable, h: torch.Tensor, start: int, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                  pos: int, allreduce_fn: int, allreduce_ctx: int) -> int:
    """Run blocks ``start``… of ``table`` on ``h`` ([hdim] fp32, updated in place) for the token
    at ``pos``, each block's partial output summed by ``allreduce_fn(allreduce_ctx, …)``. Returns
    the number of blocks when all ran; else the block whose allreduce stopped, with its partial
    output in ``table.part`` and ``h`` not yet updated by it (the caller finishes that op)."""
    lib = _lib
    assert lib is not None
    if (h.dtype != torch.float32 or h.numel() != table.hdim or not _ready(h, cos, sin) or not 0 <= pos < table.max_seq
            or tuple(cos.shape) != (1, table.head_dim) or cos.shape != sin.shape):
        raise ValueError("decode_layers: the hidden state, position or rope rows do not fit the table")
    stopped = ctypes.c_int(0)
    _threads(lib)
    rc = lib.edgemesh_decode_layers(ctypes.addressof(table.layers), table.blocks, start, _ptr(h), table.hdim,
                                    ctypes.c_float(eps), table.head_dim, _ptr(cos), _ptr(sin), table.max_seq, pos,
                                    _ptr(table.scratch), _ptr(table.part), _ptr(table.sum), allreduce_fn,
                                    allreduce_ctx, ctypes.byref(stopped))
    if rc < 0:
        raise ValueError(f"decode_layers: block {stopped.value} refused its shapes")
    return stopped.value
