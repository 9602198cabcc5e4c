"""Assemble a rank's ``Participant`` from a store and a plan (what the runtime calls).

Master side: ``rank_files(entry, specs, rank)`` writes/looks up the slice files rank needs and
returns their hashes (to ship to that worker). Worker side, after receiving and verifying
those files: ``build_participant(config, specs, paths, collective)``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from edgemesh.collective.base import Collective
from edgemesh.llm.model import Participant
from edgemesh.weights.config import ModelConfig
from edgemesh.weights.provider import InMemoryProvider
from edgemesh.weights.shard import ShardSpec
from edgemesh.weights.store import FileRef, ModelEntry


def rank_files(entry: ModelEntry, specs: list[ShardSpec], rank: int) -> dict[str, FileRef]:
    """Block name -> hashed file with that rank's slice (rank 0 also gets input/output whole)."""
    files: dict[str, FileRef] = {}
    if rank == 0:
        files["input"] = entry.files["input"]
        files["output"] = entry.files["output"]
    for i, spec in enumerate(specs):
        for kind in ("attn", "mlp"):
            block = f"{kind}_{i}"
            files[block] = entry.files[block] if spec == ShardSpec.full(entry.config) else entry.slice(block, spec)
    return files


def build_participant(
    config: ModelConfig,
    specs: list[ShardSpec],
    paths: dict[str, Path],
    collective: Collective,
    *,
    max_seq_len: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Participant:
    """A participant whose weights are the given (already verified) block files, held in RAM."""
    return Participant(config, specs, InMemoryProvider.from_files(paths, dtype), collective,
                       max_seq_len=max_seq_len, dtype=dtype)


def load_from_store(
    entry: ModelEntry,
    specs: list[ShardSpec],
    collective: Collective,
    *,
    max_seq_len: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Participant:
    """Single machine convenience: slice from the local store, verify every hash, build."""
    refs = rank_files(entry, specs, collective.rank)
    blocks = {b: entry.load_slice(ref) for b, ref in refs.items()}
    if dtype != torch.float32:
        blocks = {b: {k: v.to(dtype) if v.is_floating_point() else v for k, v in t.items()}
                  for b, t in blocks.items()}
    return Participant(entry.config, specs, InMemoryProvider(blocks), collective, max_seq_len=max_seq_len, dtype=dtype)
