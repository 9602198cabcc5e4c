"""Assemble a rank's ``Participant`` from a store and a plan (what the runtime calls).

Master side: ``rank_files(entry, specs, rank, world_size)`` writes/looks up the slice files rank needs and
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
from edgemesh.weights.shard import ShardSpec, vocab_range
from edgemesh.weights.store import FileRef, ModelEntry


def rank_files(entry: ModelEntry, specs: list[ShardSpec], rank: int, world_size: int) -> dict[str, FileRef]:
    """Block name -> hashed file with that rank's slice.

    Every rank gets ``output``: the final norm and its vocabulary rows of the head
    (``vocab_range``). Rank 0 also gets ``input`` whole: it looks tokens up for the group, and
    when the head is tied it takes its head rows from there (its range starts at row 0), so its
    ``output`` is then the plain block (the norm)."""
    config = entry.config
    start, stop = vocab_range(config, specs, rank, world_size)
    files: dict[str, FileRef] = {}
    if rank == 0:
        files["input"] = entry.files["input"]
    whole = (start, stop) == (0, config.vocab_size) or (rank == 0 and config.tie_word_embeddings)
    files["output"] = entry.files["output"] if whole else entry.head_slice(start, stop)
    for i, spec in enumerate(specs):
        for kind in ("attn", "mlp"):
            block = f"{kind}_{i}"
            files[block] = entry.files[block] if spec == ShardSpec.full(config) else entry.slice(block, spec)
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
                       max_seq_len=max_seq_len, dtype=dtype,
                       vocab=vocab_range(config, specs, collective.rank, collective.world_size))


def load_from_store(
    entry: ModelEntry,
    specs: list[ShardSpec],
    collective: Collective,
    *,
    max_seq_len: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Participant:
    """Single machine convenience: slice from the local store, verify every hash, build."""
    refs = rank_files(entry, specs, collective.rank, collective.world_size)
    blocks = {b: entry.load_slice(ref) for b, ref in refs.items()}
    if dtype != torch.float32:
        blocks = {b: {k: v.to(dtype) if v.is_floating_point() else v for k, v in t.items()}
                  for b, t in blocks.items()}
    return Participant(entry.config, specs, InMemoryProvider(blocks), collective, max_seq_len=max_seq_len, dtype=dtype,
                       vocab=vocab_range(entry.config, specs, collective.rank, collective.world_size))
