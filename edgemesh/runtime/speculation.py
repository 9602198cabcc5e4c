"""`--speculate lookup|draft:MODEL|off`: which proposer the master's engine gets per request.

A draft model runs on the master alone (a small model from the store with the same tokenizer);
the proposals are checked by the whole tensor-parallel group (llm/speculate.py), so the output
is the target model's whatever the draft proposes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

from edgemesh.collective.base import LocalCollective
from edgemesh.errors import ConfigError
from edgemesh.llm.build import rank_files
from edgemesh.llm.model import Participant
from edgemesh.llm.speculate import DraftProposer, LookupProposer, Proposer
from edgemesh.weights.provider import InMemoryProvider
from edgemesh.weights.shard import ShardSpec
from edgemesh.weights.store import ModelEntry, ModelStore

MODES = "lookup | draft:MODEL | off"


def _tokenizer_digest(entry: ModelEntry) -> str | None:
    if not entry.has("tokenizer.json"):
        return None
    return hashlib.sha256(entry.path("tokenizer.json").read_bytes()).hexdigest()


def load_draft(store: ModelStore, name: str, target: ModelEntry, max_seq_len: int) -> Participant:
    """The draft model, whole, on this machine; refused unless it shares the target's tokenizer
    (its token ids would mean other words)."""
    draft = store.get(name)
    mine, theirs = _tokenizer_digest(target), _tokenizer_digest(draft)
    if mine is None or mine != theirs:
        raise ConfigError(f"the draft model {draft.name!r} does not use the tokenizer of {target.name!r}: "
                          "speculative decoding needs the same token ids (pick a draft of the same model family)")
    if draft.config.vocab_size != target.config.vocab_size:
        raise ConfigError(f"the draft model {draft.name!r} has {draft.config.vocab_size} tokens, "
                          f"{target.name!r} has {target.config.vocab_size}")
    specs = [ShardSpec.full(draft.config)] * draft.config.num_hidden_layers
    blocks = {b: draft.load_slice(ref) for b, ref in rank_files(draft, specs, 0, 1).items()}
    return Participant(draft.config, specs, InMemoryProvider(blocks), LocalCollective(), max_seq_len=max_seq_len)


def k_max_for(entry: ModelEntry) -> int:
    """Most tokens proposed per step. int8 weights go through the packed bf16 kernel for up to
    ``PACKED_MAX_ROWS`` rows and are dequantized beyond; keeping the check within that many
    positions keeps its rounding that of plain decode steps, so greedy output stays identical.
    q4 likewise: up to ``kernels.MAX_M`` rows its kernel rounds each row's activations to int8
    as a decode step does; beyond, the dequantized path uses them unrounded."""
    from edgemesh.kernels import MAX_M
    from edgemesh.llm.qlinear import PACKED_MAX_ROWS

    if entry.dtype == "q4":
        return MAX_M - 1
    return PACKED_MAX_ROWS - 1 if entry.dtype == "int8" else 8


def proposer_factory(mode: str, store_dir: Path, target: ModelEntry,
                     max_seq_len: int) -> Callable[[], Proposer] | None:
    """A function giving each request a fresh proposer, or None for plain decoding."""
    if mode == "off":
        return None
    if mode == "lookup":
        return LookupProposer
    if mode.startswith("draft:") and mode[len("draft:"):]:
        draft = load_draft(ModelStore(store_dir), mode[len("draft:"):], target, max_seq_len)
        return lambda: DraftProposer(draft)
    raise ConfigError(f"--speculate must be {MODES} (got {mode!r})")
