"""The model store: one directory per model, one safetensors file per block, a manifest.

Layout under the store root::

    <name>/manifest.json            config, blocks in order, sha256 + size of every file
    <name>/input.safetensors        embedding
    <name>/attn_0.safetensors …     full (unsliced) decoder blocks
    <name>/output.safetensors       final norm (+ lm_head unless tied)
    <name>/tokenizer.json           HF `tokenizers` file, if the source had one
    <name>/tokenizer_config.json    chat template and special tokens
    <name>/slices/<block>.<spec>.safetensors   a participant's slice (+ .ref.json with its hash)
    <name>/slices/output.v<start>-<stop>.safetensors   a participant's vocabulary rows of the head

``dtype`` in the manifest is ``float32`` (etc.) or ``int8``: weight-only int8 with per-row
fp32 scales (``quant.py``); a quantized model is an entry of its own (``<name>-int8``).

Every file is addressed by its sha256: loads verify it, and the model id is the hash of the
manifest's content, so two stores holding the same weights agree on the id. Writes go to a
temporary name first and are renamed, so a crash never leaves a file that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgemesh.errors import ConfigError, EdgemeshError
from edgemesh.weights.aligned import load_aligned
from edgemesh.weights.config import ModelConfig
from edgemesh.weights.safetensors_io import write_safetensors
from edgemesh.weights.shard import ShardSpec, slice_block, slice_head

MANIFEST = "manifest.json"
FORMAT = "edgemesh-model/1"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class IntegrityError(EdgemeshError):
    """A stored file does not match the hash recorded for it (corrupt or tampered)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class FileRef:
    name: str  # relative to the model directory
    sha256: str
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "nbytes": self.nbytes}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FileRef:
        return cls(str(d["name"]), str(d["sha256"]), int(d["nbytes"]))


def verify_file(path: Path, ref: FileRef) -> None:
    """Raise ``IntegrityError`` unless ``path`` has the size and sha256 of ``ref``."""
    if not path.is_file():
        raise IntegrityError(f"{path}: missing (expected sha256 {ref.sha256[:16]}…)")
    size = path.stat().st_size
    if size != ref.nbytes:
        raise IntegrityError(f"{path}: {size} bytes, expected {ref.nbytes}: the file is corrupt; re-import the model")
    got = sha256_file(path)
    if got != ref.sha256:
        raise IntegrityError(
            f"{path}: sha256 {got[:16]}… does not match the manifest's {ref.sha256[:16]}…: "
            "the file is corrupt or was modified; re-import the model"
        )


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], name: str) -> FileRef:
    """Write a safetensors file atomically and return its hash (relative name ``name``); laid
    out for direct reads (``safetensors_io``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    write_safetensors(tmp, tensors, metadata={"format": "pt"})
    ref = FileRef(name, sha256_file(tmp), tmp.stat().st_size)
    os.replace(tmp, path)
    return ref


@dataclass
class ModelEntry:
    """A model in the store. ``files`` maps block name (and tokenizer files) to its file."""

    root: Path
    name: str
    config: ModelConfig
    files: dict[str, FileRef]
    source: str = ""
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def blocks(self) -> list[str]:
        return self.config.block_names()

    def manifest(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": self.name,
            "config": self.config.to_json(),
            "blocks": self.blocks,
            "files": {k: v.to_json() for k, v in sorted(self.files.items())},
            "source": self.source,
            "dtype": self.dtype,
            "extra": self.extra,
        }

    @property
    def id(self) -> str:
        """Content address: sha256 of the manifest without the (local) name and source."""
        body = {k: v for k, v in self.manifest().items() if k not in ("name", "source")}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files.values())

    @property
    def param_bytes(self) -> int:
        """Bytes per weight parameter as stored (1 for int8; its per-row scales are noise). q4
        (0.625 with its scales) counts as 1: an upper bound, the planner works in whole bytes."""
        return {"int8": 1, "q4": 1, "float16": 2, "bfloat16": 2, "float64": 8}.get(self.dtype, 4)

    def path(self, key: str) -> Path:
        return self.root / self.files[key].name

    def has(self, key: str) -> bool:
        return key in self.files

    def load_block(self, block: str, *, verify: bool = True) -> dict[str, torch.Tensor]:
        if block not in self.files:
            raise ConfigError(f"model {self.name!r} has no block {block!r}")
        path = self.path(block)
        if verify:
            verify_file(path, self.files[block])
        return load_aligned(path)  # safetensors offsets are arbitrary; kernels need 64-byte alignment

    def verify(self) -> None:
        for key, ref in self.files.items():
            verify_file(self.root / ref.name, ref)

    # ---- slices for participants ----------------------------------------------------------

    def slice(self, block: str, spec: ShardSpec) -> FileRef:
        """This block's slice for ``spec`` as a hashed file (cached under ``slices/``).

        The same block and spec always give the same bytes, hence the same hash, so a worker
        can verify a slice it received against the master's hash. Each slice has its own
        ``.ref.json`` (no shared index), so concurrent ranks can slice the same model.
        """
        name = f"slices/{block}.{spec.key()}.safetensors"
        return self._cached_slice(name, lambda: slice_block(self.config, block, self.load_block(block), spec))

    def head_slice(self, start: int, stop: int) -> FileRef:
        """The ``output`` block with only vocabulary rows ``start:stop`` of the head (from the
        embedding when tied), cached under ``slices/`` like ``slice``."""
        def build() -> dict[str, torch.Tensor]:
            embed = self.load_block("input") if self.config.tie_word_embeddings else None
            return slice_head(self.config, self.load_block("output"), embed, start, stop)
        return self._cached_slice(f"slices/output.v{start}-{stop}.safetensors", build)

    def _cached_slice(self, name: str, build: Callable[[], dict[str, torch.Tensor]]) -> FileRef:
        path, meta = self.root / name, self.root / (name + ".ref.json")
        if meta.is_file() and path.is_file():
            try:
                ref = FileRef.from_json(json.loads(meta.read_text()))
                if path.stat().st_size == ref.nbytes:
                    return ref
            except (ValueError, KeyError):
                pass  # a damaged cache entry: rebuild it
        ref = write_tensors(path, build(), name)
        _write_json(meta, ref.to_json())
        return ref

    def load_slice(self, ref: FileRef) -> dict[str, torch.Tensor]:
        path = self.root / ref.name
        verify_file(path, ref)
        return load_aligned(path)  # safetensors offsets are arbitrary; kernels need 64-byte alignment


def _tmp_name(path: Path) -> Path:
    # unique per process and thread: concurrent writers of one file must not share a temp file
    return path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


class ModelWriter:
    """Writes a model one block at a time; the manifest appears only when all blocks are in."""

    def __init__(self, store: ModelStore, name: str, config: ModelConfig, source: str, dtype: str) -> None:
        self.entry = ModelEntry(store.root / name, name, config, {}, source, dtype)
        self.entry.root.mkdir(parents=True, exist_ok=True)
        (self.entry.root / MANIFEST).unlink(missing_ok=True)

    def write_block(self, block: str, tensors: dict[str, torch.Tensor]) -> FileRef:
        if block not in self.entry.config.block_names():
            raise ConfigError(f"unknown block {block!r}")
        ref = write_tensors(self.entry.root / f"{block}.safetensors", tensors, f"{block}.safetensors")
        self.entry.files[block] = ref
        return ref

    def write_file(self, key: str, data: bytes) -> FileRef:
        """An auxiliary file (tokenizer.json, tokenizer_config.json), hashed like the blocks."""
        path = self.entry.root / key
        tmp = _tmp_name(path)
        tmp.write_bytes(data)
        os.replace(tmp, path)
        ref = FileRef(key, hashlib.sha256(data).hexdigest(), len(data))
        self.entry.files[key] = ref
        return ref

    def finish(self) -> ModelEntry:
        missing = [b for b in self.entry.blocks if b not in self.entry.files]
        if missing:
            raise ConfigError(f"model {self.entry.name!r} is incomplete: missing {missing[:3]}…")
        slices_dir = self.entry.root / "slices"
        if slices_dir.is_dir():  # old slices belong to old weights
            for p in slices_dir.iterdir():
                p.unlink()
        _write_json(self.entry.root / MANIFEST, self.entry.manifest())
        return self.entry


class ModelStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def writer(self, name: str, config: ModelConfig, *, source: str = "", dtype: str = "float32") -> ModelWriter:
        if not _NAME_RE.match(name):
            raise ConfigError(f"model name {name!r}: use letters, digits, '.', '_' or '-' (max 100)")
        return ModelWriter(self, name, config, source, dtype)

    def _read(self, d: Path) -> ModelEntry:
        try:
            m = json.loads((d / MANIFEST).read_text())
            if m.get("format") != FORMAT:
                raise ConfigError(f"{d / MANIFEST}: unknown format {m.get('format')!r}")
            return ModelEntry(
                d, str(m["name"]), ModelConfig.from_json(m["config"]),
                {k: FileRef.from_json(v) for k, v in m["files"].items()},
                str(m.get("source", "")), str(m.get("dtype", "float32")), dict(m.get("extra", {})),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{d / MANIFEST}: unreadable manifest ({exc})") from None

    def __iter__(self) -> Iterator[ModelEntry]:
        if not self.root.is_dir():
            return
        for d in sorted(self.root.iterdir()):
            if (d / MANIFEST).is_file():
                yield self._read(d)

    def list(self) -> list[ModelEntry]:
        return list(self)

    def get(self, ref: str) -> ModelEntry:
        """By name, or by a prefix (≥ 8 hex digits) of the content id."""
        d = self.root / ref
        if _NAME_RE.match(ref) and (d / MANIFEST).is_file():
            return self._read(d)
        if len(ref) >= 8:
            hits = [e for e in self if e.id.startswith(ref.lower())]
            if len(hits) == 1:
                return hits[0]
        names = ", ".join(e.name for e in self) or "none"
        raise ConfigError(f"no model {ref!r} in {self.root} (have: {names}); see `edgemesh model list`")
