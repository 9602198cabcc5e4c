"""The daemon's ViT service: a member holds ED-ViT sub-models and runs them on image batches.

``vit.has`` says whether a part (named by the sha256 of its JSON) is cached here; ``vit.load``
receives the part's JSON and safetensors weights, checks both hashes, caches them under the
state dir (``vit/<sha256>/``) and loads the sub-model; ``vit.run`` runs it on a float32 batch and
returns the packed output (features + clipped log-probabilities) the master's fusion MLP takes.
Only members may call them (mesh RPCs), and they travel over any path — LAN, direct, punched or
relayed — since a request is one image batch and a reply one small vector per image.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
from typing import Any

from edgemesh.errors import ConfigError, ProtocolError
from edgemesh.identity.statedir import StateDir
from edgemesh.rpc.dispatch import Call, Handler, Reply
from edgemesh.runtime.services import Task
from edgemesh.wire.schema import body_map, need
from edgemesh.wire.tensor import TensorSpec

MAX_PART_PARAMS = 50_000_000  # a sub-model larger than this is refused before it is built
MAX_BATCH = 256
MAX_PARTS = 32  # resident sub-models per node
_SHA = re.compile(r"^[0-9a-f]{64}$")
_FILE = re.compile(r"^[A-Za-z0-9_.-]{1,100}\.safetensors$")


def _sha(body: dict[str, Any], key: str) -> str:
    value = need(body, key, str, max_len=64)
    if not _SHA.match(value):
        raise ProtocolError(f"{key} must be a sha256 in hex")
    return value


class VitService:
    name = "vit"

    def __init__(self, state: StateDir) -> None:
        self.dir = state.path / "vit"
        self._parts: dict[str, Any] = {}  # json sha256 -> Part
        self._lock = asyncio.Lock()

    def handlers(self) -> dict[str, Handler]:
        return {"vit.has": self._rpc_has, "vit.load": self._rpc_load, "vit.run": self._rpc_run}

    def tasks(self) -> list[Task]:
        return []

    async def close(self) -> None:
        self._parts.clear()

    async def _rpc_has(self, call: Call) -> Any:
        sha = _sha(body_map(call.body), "part")
        if sha in self._parts:
            return {"loaded": True}
        if (self.dir / sha / "part.json").is_file():
            try:
                await self._load_cached(sha)
                return {"loaded": True}
            except (ConfigError, OSError, ValueError):
                shutil.rmtree(self.dir / sha, ignore_errors=True)  # damaged cache: ship it again
        return {"loaded": False}

    async def _rpc_load(self, call: Call) -> Any:
        body = body_map(call.body)
        sha, wsha = _sha(body, "part"), _sha(body, "weights_sha256")
        if len(call.tensors) != 2 or any(spec.dtype != "uint8" for spec, _ in call.tensors):
            raise ProtocolError("vit.load carries two byte frames: the part's JSON and its weights")
        raw_json, raw_weights = (bytes(v) for _, v in call.tensors)
        if hashlib.sha256(raw_json).hexdigest() != sha or hashlib.sha256(raw_weights).hexdigest() != wsha:
            raise ProtocolError("a vit part arrived with the wrong hash")
        try:
            desc = json.loads(raw_json)
            name = desc["weights"]["name"]
        except (ValueError, KeyError, TypeError):
            raise ProtocolError("the part's JSON is not a part description") from None
        if not isinstance(name, str) or not _FILE.match(name) or desc["weights"].get("sha256") != wsha:
            raise ProtocolError("the part's JSON names another weights file")
        self._check_size(desc)
        if len(self._parts) >= MAX_PARTS and sha not in self._parts:
            raise ProtocolError(f"this node already holds {MAX_PARTS} vit parts")
        target = self.dir / sha
        tmp = self.dir / f".{sha}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / "part.json").write_bytes(raw_json)
        (tmp / name).write_bytes(raw_weights)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        await self._load_cached(sha)
        return {"loaded": True}

    def _check_size(self, desc: Any) -> None:
        from edgemesh.vit.model import ViTConfig, count_params

        try:
            params = count_params(ViTConfig.from_json(desc.get("config", {})))
        except (ConfigError, TypeError, ValueError, AttributeError) as exc:
            raise ProtocolError(f"unusable vit part config: {exc}") from None
        if params > MAX_PART_PARAMS:
            raise ProtocolError(f"a vit part of {params:,} parameters is over this node's limit")

    async def _load_cached(self, sha: str) -> None:
        from edgemesh.vit.store import load_part

        path = self.dir / sha / "part.json"
        self._check_size(json.loads(path.read_text()))
        async with self._lock:
            if sha not in self._parts:
                self._parts[sha] = await asyncio.to_thread(load_part, path, sha)

    async def _rpc_run(self, call: Call) -> Any:
        import torch

        from edgemesh.vit.split import run_part

        body = body_map(call.body)
        part = self._parts.get(_sha(body, "part"))
        if part is None:
            raise ProtocolError("that vit part is not loaded here (vit.load first)")
        if len(call.tensors) != 1:
            raise ProtocolError("vit.run carries one float32 batch")
        spec, view = call.tensors[0]
        c = part.model.config
        if spec.dtype != "float32" or len(spec.shape) != 4 or tuple(spec.shape[1:]) != (c.in_chans, c.image_size,
                                                                                       c.image_size):
            raise ProtocolError(f"vit.run wants float32 [B, {c.in_chans}, {c.image_size}, {c.image_size}]")
        if not 0 < spec.shape[0] <= MAX_BATCH:
            raise ProtocolError(f"batch must be 1..{MAX_BATCH} images")
        x = torch.frombuffer(bytearray(view), dtype=torch.float32).reshape(spec.shape)
        out = (await asyncio.to_thread(run_part, part, x)).packed().contiguous()
        return Reply({"n": int(out.shape[0])}, [(TensorSpec("float32", tuple(out.shape)), out.numpy().tobytes())])
