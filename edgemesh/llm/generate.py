"""The master's token loop: prefill the prompt, then one decode step per new token."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from edgemesh.errors import ConfigError
from edgemesh.llm.model import Participant
from edgemesh.llm.sampling import Sampler, SamplingParams


@torch.inference_mode()
def generate(
    model: Participant,
    prompt_ids: list[int],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    stop_ids: Iterable[int] = (),
    *,
    sampler: Sampler | None = None,
) -> Iterator[int]:
    """Yield new token ids (a stop id is yielded, then generation ends).

    ``sampler`` lets a caller continue one request's random stream across calls (the engine
    resumes a request on a re-planned cluster by prefilling prompt + tokens so far)."""
    if not prompt_ids:
        raise ConfigError("the prompt is empty")
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if len(prompt_ids) + max_new_tokens > model.max_seq_len:
        raise ConfigError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"context of {model.max_seq_len} tokens"
        )
    sample = sampler or Sampler(params or SamplingParams())
    stops = set(stop_ids)
    if max_new_tokens == 0:
        return
    # A split model chooses over its split vocabulary (a few numbers per rank, not the logits);
    # other models (test doubles) give logits.
    choose = getattr(model, "forward_choose", None)

    def step(tokens: list[int], pos: int) -> int:
        if choose is not None:
            return choose(torch.tensor([tokens]), pos, sample)
        return sample(model.forward(torch.tensor([tokens]), pos, last_only=True)[0, -1])

    tok = step(prompt_ids, 0)
    pos = len(prompt_ids)
    for i in range(max_new_tokens):
        yield tok
        if tok in stops or i == max_new_tokens - 1:
            return
        tok = step([tok], pos)
        pos += 1
