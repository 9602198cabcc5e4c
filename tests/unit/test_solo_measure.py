"""`bench generate`'s per-rank compute figures (llm/measure.py): every rank times its own
slices, all at once, for a decode step or a whole prefill, through a live group."""

from __future__ import annotations

import pytest
import torch

from edgemesh.collective.base import Collective, LocalCollective
from edgemesh.errors import EdgemeshError
from edgemesh.llm.measure import solo_compute_ms, solo_steps_ms
from edgemesh.llm.model import Participant
from edgemesh.llm.threaded import run_thread_group
from edgemesh.weights.shard import ShardSpec, split_layer
from tests.unit.test_llm_equivalence import _blocks, _config, _prompt, _rank_provider

pytestmark = pytest.mark.unit


def test_every_rank_times_a_prefill_and_a_decode_step_of_its_slices() -> None:
    config = _config()
    blocks = _blocks(config)
    layers = [split_layer(config, [1, 1, 2], [8, 8, 80])] * config.num_hidden_layers

    def build(coll: Collective) -> Participant:
        mine = [layer[coll.rank] for layer in layers]
        return Participant(config, mine, _rank_provider(config, blocks, mine, coll.rank), coll, max_seq_len=64)

    def master(p: Participant) -> tuple[list[float], list[float], torch.Tensor]:
        # These worker threads run outside inference mode (a worker process runs inside it):
        # a first step makes their KV caches as normal tensors, which the measurement then reuses.
        p.forward(_prompt(config), 0)
        prefill = solo_compute_ms(p, 3, 0, tokens=48)
        decode = solo_compute_ms(p, 3, 50)
        return prefill, decode, p.forward(_prompt(config), 0)  # the group still computes after measuring

    prefill, decode, logits = run_thread_group(3, build, master, timeout=60)
    # Durations only: which rank is slower is a benchmark's finding, not a test's (threads of
    # one process, a host's load).
    assert len(prefill) == len(decode) == 3 and all(v > 0 for v in prefill + decode)
    full = [ShardSpec.full(config)] * config.num_hidden_layers
    one = Participant(config, full, _rank_provider(config, blocks, full, 0), LocalCollective(), max_seq_len=64)
    want = one.forward(_prompt(config), 0)
    assert torch.allclose(logits, want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_a_measurement_outside_the_context_is_refused() -> None:
    config = _config()
    full = [ShardSpec.full(config)] * config.num_hidden_layers
    p = Participant(config, full, _rank_provider(config, _blocks(config), full, 0), LocalCollective(), max_seq_len=64)
    for n, start, tokens in ((3, 40, 48), (0, 0, 1), (3, 62, 1), (3, 0, 0)):
        with pytest.raises(EdgemeshError, match="bad solo measurement"):
            solo_steps_ms(p, n, start, tokens=tokens)
    assert solo_steps_ms(p, 3, 0, tokens=64) > 0  # a prefill of the whole context fits
