"""Trained ViTs and their splits on disk, beside the LLM store (``<store>/vit/<name>``).

A full model is a directory with ``model.safetensors`` and ``model.json`` (config, dataset,
accuracy, the weights' sha256). A split is a directory::

    manifest.json            format, classes per part, every file's sha256, params, FLOPs, placement
    part0.safetensors        sub-model weights          part0.json   its ViT config + classes
    …
    fusion.safetensors       fusion MLP                 fusion.json  its config

Each file is addressed by its sha256 (recorded in the manifest and checked on load), so a
device can be sent one part (its JSON + safetensors) and verify what it got. The manifest is
written last: a directory without one is an unfinished split.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from edgemesh.config import edgemesh_home
from edgemesh.errors import ConfigError
from edgemesh.vit.model import ViT, ViTConfig, count_flops, count_params
from edgemesh.vit.split import Fusion, FusionConfig, Part, Split
from edgemesh.weights.store import FileRef, IntegrityError, sha256_file, verify_file

MODEL_FORMAT = "edgemesh-vit/1"
SPLIT_FORMAT = "edgemesh-vit-split/1"
PART_FORMAT = "edgemesh-vit-part/1"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def default_vit_dir() -> Path:
    """``$EDGEMESH_HOME/models/vit``: the ``vit`` folder of the model store."""
    return edgemesh_home() / "models" / "vit"


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ConfigError(f"bad model name {name!r}: use letters, digits, '.', '_' and '-' (max 100)")
    return name


def _write_json(path: Path, data: dict[str, Any]) -> FileRef:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return FileRef(path.name, sha256_file(path), path.stat().st_size)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> FileRef:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    return FileRef(path.name, sha256_file(path), path.stat().st_size)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing ({what})") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable {what} ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a {what}")
    return data


def _load_state(module: torch.nn.Module, path: Path) -> None:
    try:
        state = load_file(str(path))
        module.load_state_dict(state, strict=True)
    except (RuntimeError, OSError, ValueError) as exc:
        raise ConfigError(f"{path}: weights do not match the config ({str(exc).splitlines()[0]})") from None
    module.eval()


def resolve(name_or_path: str, root: Path | None, kind: str) -> Path:
    """A model/split directory from a path or a name in the store; clear error when absent."""
    marker = "model.json" if kind == "model" else "manifest.json"
    p = Path(name_or_path).expanduser()
    if (p / marker).is_file():
        return p
    base = root or default_vit_dir()
    if _NAME_RE.match(name_or_path) and (base / name_or_path / marker).is_file():
        return base / name_or_path
    hint = ("train one with `edgemesh vit train --dataset mnist`" if kind == "model"
            else "make one with `edgemesh vit split MODEL --parts N`")
    raise ConfigError(f"no ViT {kind} {name_or_path!r} (looked for {p / marker} and {base / name_or_path / marker}); {hint}")


# -- full models ---------------------------------------------------------------------------------

def save_model(directory: Path, model: ViT, meta: dict[str, Any]) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    ref = _write_tensors(directory / "model.safetensors", model.state_dict())
    info = {"format": MODEL_FORMAT, "config": model.config.to_json(), "weights": ref.to_json(),
            "params": count_params(model.config), "flops": count_flops(model.config), **meta}
    _write_json(directory / "model.json", info)
    return info


def load_model(directory: Path) -> tuple[ViT, dict[str, Any]]:
    info = _read_json(directory / "model.json", "ViT model description")
    if info.get("format") != MODEL_FORMAT:
        raise ConfigError(f"{directory / 'model.json'}: format {info.get('format')!r}, expected {MODEL_FORMAT!r}")
    model = ViT(ViTConfig.from_json(info.get("config", {})))
    ref = FileRef.from_json(info["weights"])
    verify_file(directory / ref.name, ref)
    _load_state(model, directory / ref.name)
    return model, info


# -- splits --------------------------------------------------------------------------------------

def part_json(part: Part, weights: FileRef) -> dict[str, Any]:
    return {"format": PART_FORMAT, "name": part.name, "classes": list(part.classes),
            "config": part.model.config.to_json(), "weights": weights.to_json()}


def load_part(json_path: Path, expected_sha256: str | None = None) -> Part:
    """One sub-model from its JSON (+ the safetensors beside it), hash-checked: what a device
    loads. ``expected_sha256`` is the JSON file's hash from the manifest, when known."""
    if expected_sha256 is not None and sha256_file(json_path) != expected_sha256:
        raise IntegrityError(f"{json_path}: sha256 does not match the manifest; the part was modified")
    d = _read_json(json_path, "ViT part description")
    if d.get("format") != PART_FORMAT:
        raise ConfigError(f"{json_path}: format {d.get('format')!r}, expected {PART_FORMAT!r}")
    model = ViT(ViTConfig.from_json(d.get("config", {})))
    ref = FileRef.from_json(d["weights"])
    verify_file(json_path.parent / ref.name, ref)
    _load_state(model, json_path.parent / ref.name)
    return Part(str(d["name"]), tuple(int(c) for c in d["classes"]), model)


def save_split(directory: Path, split: Split, *, placement: dict[str, Any] | None = None) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "manifest.json").unlink(missing_ok=True)
    parts = []
    for p in split.parts:
        w = _write_tensors(directory / f"{p.name}.safetensors", p.model.state_dict())
        j = _write_json(directory / f"{p.name}.json", part_json(p, w))
        parts.append({"name": p.name, "classes": list(p.classes),
                      "labels": [split.labels[c] if c < len(split.labels) else str(c) for c in p.classes],
                      "json": j.to_json(), "weights": w.to_json(), "params": p.params, "flops": p.flops,
                      "feature_dim": p.model.config.dim, "out_dim": p.out_dim})
    fw = _write_tensors(directory / "fusion.safetensors", split.fusion.state_dict())
    fj = _write_json(directory / "fusion.json", {"config": split.fusion.config.to_json(), "weights": fw.to_json()})
    fusion_params = sum(t.numel() for t in split.fusion.parameters())
    manifest = {**split.meta, "format": SPLIT_FORMAT, "labels": list(split.labels), "parts": parts,
                "fusion": {"json": fj.to_json(), "weights": fw.to_json(), "params": fusion_params}}
    if placement is not None:
        manifest["placement"] = placement
    _write_json(directory / "manifest.json", manifest)
    return manifest


def load_manifest(directory: Path) -> dict[str, Any]:
    m = _read_json(directory / "manifest.json", "ViT split manifest")
    if m.get("format") != SPLIT_FORMAT:
        raise ConfigError(f"{directory / 'manifest.json'}: format {m.get('format')!r}, expected {SPLIT_FORMAT!r}")
    return m


def load_split(directory: Path) -> Split:
    m = load_manifest(directory)
    try:
        parts = []
        for entry in m["parts"]:
            jref = FileRef.from_json(entry["json"])
            part = load_part(directory / jref.name, jref.sha256)
            if FileRef.from_json(entry["weights"]).sha256 != _read_json(directory / jref.name, "part")["weights"]["sha256"]:
                raise IntegrityError(f"{directory / jref.name}: weights hash differs from the manifest's")
            parts.append(part)
        fref = FileRef.from_json(m["fusion"]["json"])
        verify_file(directory / fref.name, fref)
        fd = _read_json(directory / fref.name, "fusion description")
        fusion = Fusion(FusionConfig.from_json(fd["config"]))
        wref = FileRef.from_json(fd["weights"])
        verify_file(directory / wref.name, wref)
        _load_state(fusion, directory / wref.name)
    except KeyError as exc:
        raise ConfigError(f"{directory / 'manifest.json'}: missing field {exc}") from None
    meta = {k: v for k, v in m.items() if k not in ("format", "labels", "parts", "fusion")}
    return Split(parts, fusion, tuple(m.get("labels", ())), meta)
