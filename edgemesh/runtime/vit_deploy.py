"""`edgemesh launch vit:SPLIT`: place a ViT split's sub-models on the members and classify with them.

The launching node is the master: it reads the split (its parts, fusion MLP and labels), places
the parts by the greedy rule (largest first to the member with the earliest finish time that has
the memory; ``placement.vit``), ships each part to its member once (hash-checked there and cached
in its state dir; a member that has it already receives nothing), and then for every batch sends
the images to every part's member at once, gathers the packed outputs and fuses them. A part
whose member does not answer in time is left out: the fusion MLP was trained with whole parts
dropped, and the answer names the parts that were missing.

Remote calls go through this node's daemon (``admin.relay``), so a member reached only by a
punched or relayed path takes part like one on the LAN. Parts placed on this node run here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from edgemesh.errors import ConfigError, EdgemeshError
from edgemesh.identity.statedir import StateDir
from edgemesh.placement.devices import Device
from edgemesh.runtime.control import control_call
from edgemesh.wire.tensor import TensorSpec

log = logging.getLogger(__name__)


@dataclass
class PartSlot:
    name: str
    node: str  # member id ("" = this node)
    node_name: str
    json_sha: str
    part: Any = None  # the Part, when it runs on this node


@dataclass
class Classified:
    probs: torch.Tensor
    missing: list[str]
    seconds: float
    parts_ms: dict[str, float] = field(default_factory=dict)


class VitDeployment:
    def __init__(self, state: StateDir, split_dir: Path, progress: Callable[[str], None] = lambda m: None,
                 part_timeout: float = 10.0, nodes: int | None = None, names: tuple[str, ...] = ()) -> None:
        from edgemesh.vit.store import load_manifest, load_split

        self.state = state
        self.dir = split_dir
        self.progress = progress
        self.part_timeout = part_timeout
        self.nodes = nodes
        self.names = names  # members to use (names or id prefixes); this node is always one
        self.manifest = load_manifest(split_dir)
        self.split = load_split(split_dir)
        self.config = self.split.parts[0].model.config  # every part takes the same input
        self.slots: list[PartSlot] = []
        self.me = ""

    @property
    def labels(self) -> tuple[str, ...]:
        return self.split.labels

    async def _relay(self, node: str, method: str, body: Any, tensors: list[tuple[TensorSpec, bytes]] = (),
                     timeout: float = 30.0) -> tuple[Any, list]:
        """A member service through our daemon; (reply body, tensors)."""
        from edgemesh.mesh.rpc import rpc_session
        from edgemesh.runtime.processes import running_daemon
        from edgemesh.transport.zmq_link import ZmqTransport

        rec = running_daemon(self.state)
        if rec is None:
            raise EdgemeshError(f"no edgemesh daemon runs for {self.state.path}")
        key, _ = self.state.load_identity()
        transport = ZmqTransport(key)
        try:
            async with rpc_session(transport, str(rec["control"]), key.curve_public, bytes.fromhex(key.node_id)) as c:
                return await c.call("admin.relay", {"node": node, "method": method, "body": body, "timeout": timeout},
                                    tensors=list(tensors), timeout=timeout + 5.0)
        finally:
            transport.close()

    # ---- placement and shipping ---------------------------------------------------
    async def deploy(self) -> list[PartSlot]:
        from edgemesh.placement.vit import PartDemand, part_memory, place_parts
        from edgemesh.vit.model import count_ops

        self.progress("asking the members for their status and profiles")
        alive = await self._members()
        if self.names:
            unknown = [n for n in self.names if not any(m["name"] == n or m["id"].startswith(n) for m in alive)]
            if unknown:
                raise ConfigError(f"no alive member named {', '.join(unknown)} (alive: {', '.join(m['name'] for m in alive)})")
            alive = [m for m in alive if m["id"] == self.me or any(m["name"] == n or m["id"].startswith(n)
                                                                   for n in self.names)]
        if self.nodes is not None:
            if self.nodes < 1:
                raise ConfigError("--nodes must be at least 1")
            alive = alive[: self.nodes]
        alive = await self._with_profiles(alive)
        devices = [Device.from_profile(m["id"], m.get("profile") or {}) for m in alive]
        demands = []
        for p in self.split.parts:
            c = p.model.config
            widest = max([*c.mlp, *(h * c.head_dim for h in c.heads), c.dim])
            demands.append(PartDemand(p.name, p.flops, part_memory(p.params, c.num_patches + 1, c.dim, widest, batch=8),
                                      count_ops(c)))
        placement = place_parts(demands, devices)
        names = {m["id"]: m["name"] for m in alive}
        entries = {e["name"]: e for e in self.manifest["parts"]}
        self.slots = []
        for p in self.split.parts:
            node = placement.device_of(p.name)
            self.slots.append(PartSlot(p.name, "" if node == self.me else node, names[node],
                                       entries[p.name]["json"]["sha256"], p if node == self.me else None))
        await asyncio.gather(*(self._ship(s) for s in self.slots if s.node))
        self.progress("parts placed: " + ", ".join(f"{s.name} on {s.node_name}" for s in self.slots))
        return self.slots

    async def _members(self) -> list[dict[str, Any]]:
        """Alive members, this node first, then by name."""
        status = await control_call(self.state, "status")
        self.me = status["node"]
        alive = [m for m in status["members"] if m["state"] == "alive"]
        alive.sort(key=lambda m: (m["id"] != self.me, m["name"]))
        return alive

    async def _with_profiles(self, chosen: list[dict[str, Any]], wait: float = 15.0) -> list[dict[str, Any]]:
        """The chosen members once each has published its device profile (a member that just
        started needs a moment for its record to reach us); placement needs their memory."""
        ids = {m["id"] for m in chosen}
        deadline = time.monotonic() + wait
        while True:
            current = [m for m in await self._members() if m["id"] in ids]
            missing = [m["name"] for m in current if "mem_total" not in (m.get("profile") or {})]
            if not missing and len(current) == len(ids):
                return current
            if time.monotonic() > deadline:
                raise EdgemeshError(f"no device profile from {', '.join(missing) or 'a chosen member'} after {wait:.0f} s; "
                                    "is it running an older edgemesh?")
            await asyncio.sleep(0.3)

    async def _ship(self, slot: PartSlot) -> None:
        reply, _ = await self._relay(slot.node, "vit.has", {"part": slot.json_sha})
        if isinstance(reply, dict) and reply.get("loaded"):
            return
        entry = next(e for e in self.manifest["parts"] if e["name"] == slot.name)
        raw_json = (self.dir / entry["json"]["name"]).read_bytes()
        raw_weights = (self.dir / entry["weights"]["name"]).read_bytes()
        self.progress(f"shipping {slot.name} ({len(raw_weights) / 1e6:.1f} MB) to {slot.node_name}")
        try:
            await self._relay(slot.node, "vit.load", {"part": slot.json_sha, "weights_sha256": entry["weights"]["sha256"]},
                              [(TensorSpec("uint8", (len(raw_json),)), raw_json),
                               (TensorSpec("uint8", (len(raw_weights),)), raw_weights)], timeout=120.0)
        except EdgemeshError as exc:
            raise EdgemeshError(f"{slot.node_name} could not take {slot.name}: {exc}") from None

    # ---- inference ------------------------------------------------------------------
    async def classify(self, inputs: torch.Tensor) -> Classified:
        """Class probabilities for a batch of model inputs [B, C, H, W], from the parts that answer."""
        from edgemesh.vit.split import run_part

        x = inputs.to(torch.float32).contiguous()
        raw = x.numpy().tobytes()
        spec = TensorSpec("float32", tuple(x.shape))
        t0 = time.perf_counter()
        times: dict[str, float] = {}

        async def one(slot: PartSlot) -> tuple[str, torch.Tensor]:
            start = time.perf_counter()
            if not slot.node:
                out = (await asyncio.to_thread(run_part, slot.part, x)).packed()
            else:
                _, tensors = await self._relay(slot.node, "vit.run", {"part": slot.json_sha}, [(spec, raw)],
                                               timeout=self.part_timeout)
                if len(tensors) != 1 or tensors[0][0].dtype != "float32" or tensors[0][0].shape[0] != x.shape[0]:
                    raise EdgemeshError(f"{slot.node_name} sent a malformed output for {slot.name}")
                out = torch.frombuffer(bytearray(tensors[0][1]), dtype=torch.float32).reshape(tensors[0][0].shape)
            times[slot.name] = (time.perf_counter() - start) * 1000
            return slot.name, out

        results = await asyncio.gather(*(asyncio.wait_for(one(s), self.part_timeout + 5.0) for s in self.slots),
                                       return_exceptions=True)
        packed: dict[str, torch.Tensor] = {}
        for slot, r in zip(self.slots, results):
            if isinstance(r, BaseException):
                log.warning("part %s on %s did not answer: %s", slot.name, slot.node_name, r)
                continue
            packed[r[0]] = r[1]
        if not packed:
            raise EdgemeshError("no part answered: " + ", ".join(f"{s.name} on {s.node_name}" for s in self.slots))

        def fused() -> tuple[torch.Tensor, list[str]]:
            # The members send packed outputs (features | log-probs): straight into the fusion MLP.
            fusion = self.split.fusion
            fusion.eval()
            with torch.inference_mode():
                probs = fusion([packed.get(n) for n in fusion.config.parts]).softmax(-1)
            return probs, [n for n in fusion.config.parts if n not in packed]

        probs, missing = await asyncio.to_thread(fused)
        return Classified(probs, missing, time.perf_counter() - t0, times)
