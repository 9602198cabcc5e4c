"""Sliding-window weight provider: stream a participant's blocks from disk (ALGORITHMS §3).

A participant's blocks run in a fixed cyclic order (``execution_order``): on the master
``attn_0, mlp_0, …, output`` (with ``input`` first and last when the head is tied to the
embedding: its head rows are in it), on a worker its decoder slices and ``output`` (its
vocabulary rows of the head). An untied master's embedding is not windowed at all: the lookup
reads just the rows of the step's tokens from the file (``rows``). A loader thread reads blocks ahead in that
order, wrapping to the start for the next token, and never holds more than ``window`` blocks
(loaded, being computed, or being read). ``get`` hands out the next block (waiting for it if
the disk is behind: a *stall*), ``release`` drops it, which lets the loader read the block
``window`` steps ahead.

Memory stays bounded: a block is read (``pread``, no mmap of the file: mapped file pages are
charged to the process's cgroup and stay resident while referenced) into one anonymous mapping
of its own, each tensor at a 64-byte aligned offset in it; the file's pages are dropped from the
page cache after each read (``posix_fadvise(DONTNEED)``). A released block's mapping is reused
for a later block of the same size when no tensor refers to it any more, but only while the
resident blocks plus the kept mappings stay within the window's peak (the largest w consecutive
blocks); otherwise it is dropped and returns to the OS. Reusing mappings matters on small CPUs:
reading into fresh memory page-faults and zero-fills every page first (3-4x the CPU time of the
read itself from the page cache, measured), which the loader thread takes from compute.

The provider also measures what the no-stall conditions need: compute per attention / MLP
block (``get`` → ``release``), the gap between one decoder block's release and the next one's
``get`` (the allreduce, which the model runs right there), and the disk time of every load.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from edgemesh.errors import ConfigError, EdgemeshError
from edgemesh.weights.config import ModelConfig
from edgemesh.weights.safetensors_io import DTYPES, PAGE
from edgemesh.weights.store import FileRef, ModelEntry, verify_file

log = logging.getLogger(__name__)

# Read in pieces and drop each piece from the page cache right away: the cache never holds
# more than one piece of a block, not the whole block.
READ_CHUNK = 16 << 20



class WeightLoadError(EdgemeshError):
    """A block file could not be read (missing, truncated, not safetensors)."""


def execution_order(config: ModelConfig, rank: int, head: bool | None = None) -> list[str]:
    """Blocks in the order ``Participant`` asks for them during one forward. ``head``: whether
    this rank holds rows of the head (``output``); a planned group gives every rank some
    (``rank_files``), None means only rank 0 (the whole head on the master)."""
    tied = rank == 0 and config.tie_word_embeddings and bool(head or head is None)
    # The master's embedding enters the window only when the head is tied (its head rows are in
    # it); otherwise the lookup reads just the rows of the step's tokens (``WindowedProvider.rows``).
    order = ["input"] if tied else []
    for i in range(config.num_hidden_layers):
        order += [f"attn_{i}", f"mlp_{i}"]
    if head or (head is None and rank == 0):
        order.append("output")
        if tied:  # the master's head rows are in the embedding
            order.append("input")
    return order


def _drop_cache(fd: int, offset: int = 0, length: int = 0) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def drop_file_cache(path: Path) -> None:
    """Evict ``path``'s clean pages from the page cache (after hashing it, say)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _drop_cache(fd)
    finally:
        os.close(fd)


def _read_exact(fd: int, view: memoryview, offset: int, drop: bool) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:done + READ_CHUNK]], offset + done)
        if n <= 0:
            raise WeightLoadError("file ends early")
        if drop:
            _drop_cache(fd, offset + done, n)
        done += n


ALIGN = 64  # every tensor starts on this boundary in its block's mapping (int8 kernels need it)


def fresh_mapping(nbytes: int) -> mmap.mmap:
    """A new anonymous mapping with its pages populated in one call (``MAP_POPULATE``): about
    half the CPU time of faulting them in page by page as a read fills them (31 vs 74 ms per
    69 MB measured here); plain where the flag does not exist."""
    flag = getattr(mmap, "MAP_POPULATE", 0)
    if flag:
        try:
            return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | flag)
        except OSError:
            pass
    return mmap.mmap(-1, nbytes)


def _aligned_size(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def read_safetensors(path: Path, *, drop_cache: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, in a fresh anonymous mapping of its own."""
    return read_block(path, drop_cache=drop_cache)[0]


def read_block(path: Path, *, drop_cache: bool = True,
               take: Callable[[int], mmap.mmap] | None = None) -> tuple[dict[str, torch.Tensor], mmap.mmap | None]:
    """Every tensor of a safetensors file, all in one anonymous mapping (each at a 64-byte
    aligned offset); returns the tensors and that mapping (None for a file of empty tensors).

    ``take(nbytes)`` supplies the mapping (a reused one, say); by default a fresh one. Not
    ``safetensors.load_file``: it maps the whole file, so every page of it enters the page
    cache (charged to our cgroup) and stays while mapped, and it leaves no say over where the
    tensors are allocated.

    With ``drop_cache`` and a file laid out for it (``safetensors_io``: every tensor 64-byte
    aligned in the file), the data region is read with ``O_DIRECT``, straight from the disk into
    the mapping; otherwise with buffered reads whose pages are dropped from the cache after each
    piece."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise WeightLoadError(f"{path}: cannot open block file ({exc.strerror})") from None
    try:
        base, layout = _layout(path, fd)
        if drop_cache and _direct_possible(base, layout):
            got = _read_direct(path, base, layout, take)
            if got is not None:
                return got
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        total = sum(_aligned_size(end - begin) for _, _, _, begin, end in layout)
        out: dict[str, torch.Tensor] = {}
        buf = None if not total else take(total) if take is not None else fresh_mapping(total)
        view = memoryview(buf) if buf is not None else None
        at = 0
        try:
            for name, dtype, shape, begin, end in layout:
                if end == begin:
                    out[name] = torch.empty(shape, dtype=dtype)
                    continue
                assert view is not None
                _read_exact(fd, view[at:at + end - begin], base + begin, drop_cache)
                out[name] = torch.frombuffer(buf, dtype=torch.uint8, count=end - begin, offset=at).view(dtype).view(shape)
                at += _aligned_size(end - begin)
        finally:
            if view is not None:
                view.release()
        return out, buf
    except WeightLoadError:
        raise
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise WeightLoadError(f"{path}: cannot read block file ({exc})") from None
    finally:
        if drop_cache:
            _drop_cache(fd)
        os.close(fd)


_Layout = list[tuple[str, torch.dtype, list[int], int, int]]  # name, dtype, shape, begin, end (data offsets)


def _layout(path: Path, fd: int) -> tuple[int, _Layout]:
    """The data region's file offset and the tensors in file order, every size checked."""
    head = os.pread(fd, 8, 0)
    if len(head) != 8:
        raise WeightLoadError(f"{path}: not a safetensors file (too short)")
    n = int.from_bytes(head, "little")
    if not 0 < n <= 100 << 20:
        raise WeightLoadError(f"{path}: not a safetensors file (header size {n})")
    try:
        header = json.loads(os.pread(fd, n, 8))
    except ValueError:
        raise WeightLoadError(f"{path}: unreadable safetensors header") from None
    if not isinstance(header, dict):
        raise WeightLoadError(f"{path}: unreadable safetensors header")
    size = os.fstat(fd).st_size
    layout: _Layout = []
    for name, info in sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                             key=lambda kv: kv[1]["data_offsets"][0]):
        dtype = DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise WeightLoadError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        shape = [int(s) for s in info["shape"]]
        begin, end = (int(x) for x in info["data_offsets"])
        numel = 1
        for s in shape:
            numel *= s
        if numel * torch.empty((), dtype=dtype).element_size() != end - begin or begin < 0 or min(shape, default=0) < 0:
            raise WeightLoadError(f"{path}: tensor {name!r} size does not match its shape")
        if 8 + n + end > size:
            raise WeightLoadError(f"{path}: file ends early (tensor {name!r})")
        layout.append((name, dtype, shape, begin, end))
    return 8 + n, layout


def block_memory(path: Path) -> int:
    """Bytes ``read_block`` maps for ``path`` (the larger of its two ways to read it); the file
    size when the file cannot be read (the loader reports that when it gets there)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return 0
    try:
        base, layout = _layout(path, fd)
    except (WeightLoadError, OSError, KeyError, TypeError, ValueError):
        return os.fstat(fd).st_size
    finally:
        os.close(fd)
    ends = [e for _, _, _, b, e in layout if e > b]
    direct = -(-(base + max(ends) - base // PAGE * PAGE) // PAGE) * PAGE if ends else 0
    return max(direct, sum(_aligned_size(e - b) for _, _, _, b, e in layout))


def _direct_possible(base: int, layout: _Layout) -> bool:
    return _direct_ok and hasattr(os, "O_DIRECT") and all((base + b) % ALIGN == 0 for _, _, _, b, e in layout if e > b)


_direct_ok = True  # False once the filesystem refused O_DIRECT (tmpfs, say): buffered reads from then on
DIRECT_CHUNK = 64 << 20  # per read call; larger pieces cost less CPU per byte (measured 16-256 MiB)


def _read_direct(path: Path, base: int, layout: _Layout,
                 take: Callable[[int], mmap.mmap] | None) -> tuple[dict[str, torch.Tensor], mmap.mmap | None] | None:
    """Read the data region with ``O_DIRECT`` into one page-aligned mapping; the tensors are
    views at their offsets in it. None when the filesystem does not do direct I/O."""
    global _direct_ok
    ends = [e for _, _, _, b, e in layout if e > b]
    if not ends:
        return {name: torch.empty(shape, dtype=dtype) for name, dtype, shape, _, _ in layout}, None
    first = base // PAGE * PAGE
    need = base + max(ends) - first
    nbytes = -(-need // PAGE) * PAGE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            _direct_ok = False
            log.info("weight window: %s does not allow O_DIRECT; buffered reads", path.parent)
            return None
        raise
    try:
        buf = take(nbytes) if take is not None else fresh_mapping(nbytes)
        view = memoryview(buf)
        try:
            done = 0
            while done < need:
                try:
                    n = os.preadv(fd, [view[done:min(nbytes, done + DIRECT_CHUNK)]], first + done)
                except OSError as exc:
                    if exc.errno == errno.EINVAL:
                        _direct_ok = False
                        log.info("weight window: O_DIRECT read refused (%s); buffered reads", exc)
                        return None
                    raise
                if n <= 0:
                    raise WeightLoadError(f"{path}: file ends early")
                done += n
        finally:
            view.release()
    finally:
        os.close(fd)
    out: dict[str, torch.Tensor] = {}
    for name, dtype, shape, begin, end in layout:
        if end == begin:
            out[name] = torch.empty(shape, dtype=dtype)
        else:
            out[name] = torch.frombuffer(buf, dtype=torch.uint8, count=end - begin,
                                         offset=base + begin - first).view(dtype).view(shape)
    return out, buf


def _kind(block: str) -> str:
    return "attn" if block.startswith("attn_") else "mlp" if block.startswith("mlp_") else "other"


@dataclass(frozen=True)
class WindowStats:
    """Averages since the last ``reset_stats`` (ms). ``no_stall`` applies ALGORITHMS §3:
    t_a + t_ar ≥ τ_f and t_f + t_ar ≥ τ_a (None until both kinds were seen)."""

    window: int
    tokens: int  # forwards (cycles through the order) completed
    t_a_ms: float  # compute of one attention block
    t_f_ms: float  # compute of one MLP block
    t_ar_ms: float  # gap between consecutive decoder blocks: the allreduce
    tau_a_ms: float  # disk load of one attention block
    tau_f_ms: float  # disk load of one MLP block
    tau_other_ms: float  # input / output blocks (master)
    stall_ms_per_token: float  # time ``get`` waited for the disk, per forward
    bytes_read: int
    read_mbyte_s: float  # bytes read / seconds spent reading
    load_cpu_ms_per_token: float  # CPU time the loader thread used, per forward (taken from compute on a busy CPU)
    max_resident_blocks: int
    max_resident_bytes: int
    no_stall: bool | None

    def to_json(self) -> dict[str, object]:
        return asdict(self)


class _Acc:
    def __init__(self) -> None:
        self.sum: dict[str, float] = {}
        self.n: dict[str, int] = {}

    def add(self, key: str, seconds: float) -> None:
        self.sum[key] = self.sum.get(key, 0.0) + seconds
        self.n[key] = self.n.get(key, 0) + 1

    def ms(self, key: str) -> float:
        return 1e3 * self.sum.get(key, 0.0) / self.n[key] if self.n.get(key) else 0.0


class WindowedProvider:
    """A ``WeightProvider`` that keeps at most ``window`` of ``order``'s blocks in memory.

    ``files`` maps block name → this participant's (already verified) safetensors file.
    ``get`` must follow ``order`` cyclically; a call that skips ahead (a forward abandoned
    half way, say) re-synchronizes to the next occurrence of the asked block. Call
    ``close()`` (or use it as a context manager) to stop the loader thread.
    """

    def __init__(self, files: Mapping[str, Path], order: list[str], window: int, *,
                 dtype: torch.dtype | None = None, drop_cache: bool = True, name: str = "") -> None:
        if window < 2:
            raise ConfigError(f"the weight window must hold at least 2 blocks (got {window})")
        missing = sorted({b for b in order if b not in files})
        if missing:
            raise ConfigError(f"no weight file for block(s) {', '.join(missing[:4])}")
        if not order:
            raise ConfigError("a windowed provider needs at least one block")
        self.files = {b: Path(p) for b, p in files.items()}
        self.order = list(order)
        self._in_order = frozenset(order)
        self._row_layouts: dict[str, tuple[int, dict[str, tuple[torch.dtype, list[int], int, int]]]] = {}
        self.window = window
        self.dtype = dtype
        self.drop_cache = drop_cache
        self._cv = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        self._next_load = 0  # position (in the endless cyclic sequence) the loader reads next
        self._next_get = 0  # position the next ``get`` expects
        self._loading: int | None = None
        self._ready: dict[int, tuple[dict[str, torch.Tensor], int]] = {}  # pos -> (tensors, bytes)
        self._held: dict[str, list[tuple[int, dict[str, torch.Tensor], int, float]]] = {}  # name -> [(pos, t, bytes, t_get)]
        self._loading_bytes = 0
        self._buf_of: dict[int, mmap.mmap] = {}  # pos -> the mapping its tensors live in
        self._free: list[mmap.mmap] = []  # released mappings kept for reuse
        self._reserved: mmap.mmap | None = None  # a kept mapping set aside for the read in flight
        try:
            self._sizes = {b: self.files[b].stat().st_size for b in set(order)}
        except OSError as exc:
            raise WeightLoadError(f"{exc.filename}: block file missing ({exc.strerror})") from None
        self._mem = {b: block_memory(self.files[b]) for b in set(order)}  # what a resident copy takes
        sizes = [self._mem[b] for b in self.order]
        span = min(window, len(sizes))
        # resident blocks + kept mappings never exceed the largest w consecutive blocks
        self._keep_limit = max(sum(sizes[(i + j) % len(sizes)] for j in range(span)) for i in range(len(sizes)))
        self.reused_mappings = 0  # loads that reused a released block's mapping
        self.reset_stats()
        self._thread = threading.Thread(target=self._run, name=f"edgemesh-window{('-' + name) if name else ''}",
                                        daemon=True)
        self._thread.start()

    # ---- the WeightProvider protocol ---------------------------------------------------

    def get(self, block: str) -> dict[str, torch.Tensor]:
        n = len(self.order)
        t_call = time.perf_counter()
        with self._cv:
            self._check()
            pos = self._next_get
            if self.order[pos % n] != block:
                pos = self._resync(block)
            if pos % n == 0 and pos > 0:
                self._end_token()
            while pos not in self._ready:
                self._check()
                self._cv.wait()
            tensors, nbytes = self._ready.pop(pos)
            self._next_get = pos + 1
            t_got = time.perf_counter()
            self._acc.add("stall", t_got - t_call)
            kind = _kind(block)
            if kind != "other" and self._last_release is not None:
                prev_pos, prev_kind, t_rel = self._last_release
                if prev_pos == pos - 1 and prev_kind != "other":
                    self._acc.add("ar", t_call - t_rel)
            self._held.setdefault(block, []).append((pos, tensors, nbytes, t_got))
            return tensors

    def rows(self, block: str, names: tuple[str, ...], ids: list[int]) -> dict[str, torch.Tensor] | None:
        """Rows ``ids`` of the tensors ``names`` of a block that has a file but is not in the
        window's order (the master's embedding, when the head is not tied to it): read from the
        file right away, a few KiB per token instead of the whole table. None for a windowed
        block (the caller then ``get``s it). Tensors the block lacks are left out."""
        if block in self._in_order or block not in self.files:
            return None
        t0 = time.perf_counter()
        path = self.files[block]
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise WeightLoadError(f"{path}: cannot open block file ({exc.strerror})") from None
        try:
            with self._cv:
                layout = self._row_layouts.get(block)
            if layout is None:
                base, entries = _layout(path, fd)
                layout = (base, {name: (dtype, shape, begin, end) for name, dtype, shape, begin, end in entries})
                with self._cv:
                    self._row_layouts[block] = layout
            base, tensors = layout
            out: dict[str, torch.Tensor] = {}
            nbytes = 0
            for name in names:
                if name not in tensors:
                    continue
                dtype, shape, begin, end = tensors[name]
                if not shape or shape[0] == 0:
                    raise WeightLoadError(f"{path}: tensor {name!r} has no rows")
                if any(not 0 <= i < shape[0] for i in ids):
                    raise ConfigError(f"token id out of range for {block}.{name} ({shape[0]} rows)")
                row = (end - begin) // shape[0]
                buf = bytearray(row * len(ids))
                view = memoryview(buf)
                try:
                    for j, i in enumerate(ids):
                        at = base + begin + i * row
                        if os.preadv(fd, [view[j * row:(j + 1) * row]], at) != row:
                            raise WeightLoadError(f"{path}: file ends early")
                        if self.drop_cache:
                            _drop_cache(fd, at, row)
                finally:
                    view.release()
                nbytes += len(buf)
                out[name] = (torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(len(ids), *shape[1:])
                             if buf else torch.empty((0, *shape[1:]), dtype=dtype))
        except OSError as exc:
            raise WeightLoadError(f"{path}: cannot read rows ({exc})") from None
        finally:
            os.close(fd)
        with self._cv:
            self._acc.add("rows", time.perf_counter() - t0)
            self._bytes_read += nbytes
        return out

    def release(self, block: str) -> None:
        t = time.perf_counter()
        with self._cv:
            held = self._held.get(block)
            if not held:
                return  # nothing to drop (released twice, or after a re-sync)
            pos, tensors, _, t_got = held.pop(0)
            if not held:
                del self._held[block]
            del tensors  # the caller's references are gone too: the memory returns now (or is reused)
            self._recycle(self._buf_of.pop(pos, None))
            self._acc.add(_kind(block), t - t_got)
            self._last_release = (pos, _kind(block), t)
            self._cv.notify_all()

    # ---- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Stop the loader and drop every block (idempotent)."""
        with self._cv:
            self._closed = True
            self._ready.clear()
            self._held.clear()
            self._buf_of.clear()
            self._free.clear()
            self._cv.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def __enter__(self) -> WindowedProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- introspection ---------------------------------------------------------------------

    def blocks(self) -> list[str]:
        return list(dict.fromkeys(self.order))

    def block_nbytes(self) -> dict[str, int]:
        """File size of every block (≈ its tensors' bytes: the header is a few hundred bytes)."""
        return dict(self._sizes)

    def nbytes(self) -> int:
        """Bytes resident now (loaded, held, being read, or kept for reuse)."""
        with self._cv:
            return self._resident_bytes() + self._free_bytes()

    def reset_stats(self) -> None:
        with self._cv:
            self._acc = _Acc()
            self._tokens = 0
            self._bytes_read = 0
            self._read_s = 0.0
            self._load_cpu_s = 0.0
            self._max_blocks = 0
            self._max_bytes = 0
            self._last_release: tuple[int, str, float] | None = None

    def stats(self) -> WindowStats:
        with self._cv:
            a = self._acc
            t_a, t_f, t_ar = a.ms("attn"), a.ms("mlp"), a.ms("ar")
            tau_a, tau_f = a.ms("load_attn"), a.ms("load_mlp")
            seen = a.n.get("attn") and a.n.get("mlp") and a.n.get("load_attn") and a.n.get("load_mlp")
            return WindowStats(
                self.window, self._tokens, round(t_a, 4), round(t_f, 4), round(t_ar, 4), round(tau_a, 4),
                round(tau_f, 4), round(a.ms("load_other"), 4),
                round(1e3 * a.sum.get("stall", 0.0) / max(self._tokens, 1), 4), self._bytes_read,
                round(self._bytes_read / self._read_s / 1e6, 1) if self._read_s > 0 else 0.0,
                round(1e3 * self._load_cpu_s / max(self._tokens, 1), 4),
                self._max_blocks, self._max_bytes,
                (t_a + t_ar >= tau_f and t_f + t_ar >= tau_a) if seen else None)

    # ---- internals (``self._cv`` held) -----------------------------------------------------

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise EdgemeshError("the weight window was closed")

    def _resident(self) -> int:
        return len(self._ready) + sum(len(v) for v in self._held.values()) + (self._loading is not None)

    def _resident_bytes(self) -> int:
        return (sum(b for _, b in self._ready.values()) + sum(x[2] for v in self._held.values() for x in v)
                + (self._loading_bytes if self._loading is not None else 0))

    def _resync(self, block: str) -> int:
        """The caller left the expected order: skip to ``block``'s next occurrence."""
        n = len(self.order)
        start = self._next_get
        for pos in range(start, start + n):
            if self.order[pos % n] == block:
                break
        else:
            raise ConfigError(f"this participant's weight window has no block {block!r}")
        log.debug("weight window: %s asked out of order (expected %s); skipping ahead",
                  block, self.order[start % n])
        for p in [p for p in self._ready if p < pos]:
            del self._ready[p]
            self._buf_of.pop(p, None)
        for name in list(self._held):  # blocks of an abandoned forward: the caller dropped them
            for x in self._held[name]:
                if x[0] < start:
                    self._buf_of.pop(x[0], None)
            self._held[name] = [x for x in self._held[name] if x[0] >= start]
            if not self._held[name]:
                del self._held[name]
        if self._next_load < pos:
            self._next_load = pos  # a read in flight for a skipped position is discarded on arrival
        self._cv.notify_all()
        return pos

    def _end_token(self) -> None:
        self._tokens += 1
        if log.isEnabledFor(logging.DEBUG):
            s = self.stats()
            log.debug("window w=%d token %d: t_a %.2f t_f %.2f t_ar %.2f ms | tau_a %.2f tau_f %.2f ms | "
                      "stall %.2f ms/token | %.0f MB/s | no-stall %s", s.window, s.tokens, s.t_a_ms, s.t_f_ms,
                      s.t_ar_ms, s.tau_a_ms, s.tau_f_ms, s.stall_ms_per_token, s.read_mbyte_s, s.no_stall)

    def _shared(self, block: str) -> tuple[dict[str, torch.Tensor], int, mmap.mmap | None] | None:
        """A copy of ``block`` already resident (the tied head's embedding read twice in a row)."""
        for pos, (t, b) in self._ready.items():
            if self.order[pos % len(self.order)] == block:
                return t, b, self._buf_of.get(pos)
        held = self._held.get(block)
        return (held[-1][1], held[-1][2], self._buf_of.get(held[-1][0])) if held else None

    # ---- mapping reuse (``self._cv`` held) ---------------------------------------------------

    def _free_bytes(self) -> int:
        return sum(len(b) for b in self._free)

    def _recycle(self, buf: mmap.mmap | None) -> None:
        """Keep a released block's mapping for reuse if the bound allows; else let it go."""
        if buf is None or any(b is buf for b in self._buf_of.values()):
            return  # still the mapping of another resident position (the tied head)
        if self._resident_bytes() + self._free_bytes() + len(buf) <= self._keep_limit:
            self._free.append(buf)

    def _reusable(self, nbytes: int, resize: bool = False) -> mmap.mmap | None:
        """Take out of the kept mappings one of about ``nbytes`` that no tensor uses any more.
        With ``resize``, when none has about that size, the largest unused one is resized to
        ``nbytes`` (``mremap``: its pages move along, only a grown tail is new): blocks of
        alternating sizes (attention, MLP) with an odd window otherwise never find their size."""
        unused = []
        for i in range(len(self._free)):
            # references: the list and getrefcount's argument; any more is a live tensor
            if sys.getrefcount(self._free[i]) <= 2:
                if nbytes <= len(self._free[i]) <= nbytes + nbytes // 4:
                    return self._free.pop(i)
                unused.append(i)
        if not resize or not unused:
            return None
        buf = self._free.pop(max(unused, key=lambda i: len(self._free[i])))
        try:
            buf.resize(nbytes)
        except (BufferError, OSError, ValueError, SystemError):
            return None  # dropped: a fresh mapping is made instead
        return buf

    def _take(self, nbytes: int) -> mmap.mmap:
        """The mapping reserved for the block being read if it fits ``nbytes``, else a kept one
        that does, else a fresh one."""
        with self._cv:
            got, self._reserved = self._reserved, None
            if got is None or not nbytes <= len(got) <= nbytes + nbytes // 4:
                got = self._reusable(nbytes)
            if got is not None:
                self.reused_mappings += 1
                return got
            self._trim()  # the block being read is counted as resident already
        return fresh_mapping(nbytes)

    def _trim(self) -> None:
        """Give back kept mappings (largest first) until they fit beside the resident blocks."""
        if self._free and self._resident_bytes() + self._free_bytes() > self._keep_limit:
            self._free.sort(key=len)
            while self._free and self._resident_bytes() + self._free_bytes() > self._keep_limit:
                self._free.pop()

    # ---- the loader thread -----------------------------------------------------------------

    def _run(self) -> None:
        n = len(self.order)
        try:
            while True:
                with self._cv:
                    while not self._closed and self._resident() >= self.window:
                        self._cv.wait()
                    if self._closed:
                        return
                    pos = self._next_load
                    block = self.order[pos % n]
                    shared = self._shared(block)
                    self._loading = pos
                    # Reserve a kept mapping for this read before counting it as resident: kept
                    # mappings and the block being read must not both count against the bound
                    # (with w = 2 that would drop every kept mapping just before its reuse).
                    self._reserved = self._reusable(self._mem[block], resize=True) if shared is None else None
                    self._loading_bytes = len(self._reserved) if self._reserved is not None else self._mem[block]
                    self._note_peak()
                buf: mmap.mmap | None
                if shared is None:
                    t0, c0 = time.perf_counter(), time.thread_time()
                    if self.dtype is None:
                        tensors, buf = read_block(self.files[block], drop_cache=self.drop_cache, take=self._take)
                    else:  # int8 weights stay int8: only float tensors change dtype (into fresh memory)
                        tensors, buf = read_block(self.files[block], drop_cache=self.drop_cache)
                        tensors = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in tensors.items()}
                        buf = None
                    dt, cpu = time.perf_counter() - t0, time.thread_time() - c0
                    nbytes = len(buf) if buf is not None else sum(t.numel() * t.element_size() for t in tensors.values())
                else:
                    tensors, nbytes, buf = shared
                with self._cv:
                    self._loading = None
                    self._reserved = None  # unused (a dtype conversion reads into fresh memory)
                    if self._closed:
                        return
                    if shared is None:
                        self._acc.add("load_" + _kind(block), dt)
                        self._bytes_read += self._sizes[block]
                        self._read_s += dt
                        self._load_cpu_s += cpu
                    if pos == self._next_load:  # not skipped by a re-sync meanwhile
                        self._ready[pos] = (tensors, nbytes)
                        if buf is not None:
                            self._buf_of[pos] = buf
                        self._next_load = pos + 1
                        self._note_peak()
                    del tensors, buf
                    self._cv.notify_all()
        except BaseException as exc:  # noqa: BLE001 — handed to the compute thread's next ``get``
            with self._cv:
                self._loading = None
                self._error = exc if isinstance(exc, EdgemeshError) else WeightLoadError(f"weight loader failed: {exc!r}")
                self._cv.notify_all()

    def _note_peak(self) -> None:
        self._trim()
        self._max_blocks = max(self._max_blocks, self._resident())
        self._max_bytes = max(self._max_bytes, self._resident_bytes() + self._free_bytes())


def windowed_from_store(entry: ModelEntry, refs: Mapping[str, FileRef], rank: int, window: int) -> WindowedProvider:
    """A window over slice files of the local store (the master's): every file's hash is
    checked once here, then its pages are dropped from the page cache again."""
    files = {}
    for block, ref in refs.items():
        path = entry.root / ref.name
        verify_file(path, ref)
        drop_file_cache(path)
        files[block] = path
    return WindowedProvider(files, execution_order(entry.config, rank, "output" in files), window, name=f"rank{rank}")
