"""The next token chosen over a vocabulary split across ranks, without shipping whole logits.

Each rank holds logits for its rows ``[start, stop)`` of the vocabulary (``weights.shard.
vocab_range``; the ranges tile ``0..V`` in rank order). Each rank reduces its slice to a small
*summary* (``summarize``), the master gathers the summaries and decides (``decide``):

- greedy: each rank sends its largest logit and its global index (``torch.argmax`` gives the
  first of equal maxima); the master takes the largest value, ties to the lowest rank, which
  is the lowest global index: exactly ``torch.argmax`` over the whole vocabulary.
- sampling (``Sampler`` semantics: temperature, then top-k, then top-p): each rank sends
  ``logsumexp`` of its slice, its ``K = max(top_k, CANDIDATES)`` largest logits with their
  indices, and a token drawn from its own slice's softmax by inverse CDF with a uniform ``u``
  the master sent along with the step. Then:

  * no top-k / top-p: the distribution is ``softmax`` over everything. The master picks rank
    ``r`` with probability ``exp(lse_r − lse)`` (a second, independent uniform) and takes
    ``r``'s pre-drawn token, which is ``j`` with probability ``exp(z_j − lse_r)``: the product
    is ``exp(z_j − lse)``. No second round trip.
  * top-k: the kept set is every token ``≥`` the k-th largest logit. The union of the ranks'
    top ``K ≥ k`` holds the k largest; it holds every token of the kept set unless an unsent
    logit equals the threshold (ties): each rank also sends its largest unsent logit, and the
    largest of those, ``m``, is checked against the threshold.
  * top-p: tokens in descending order are kept while the mass before them is below ``top_p``.
    Every token above ``m`` is a candidate, so if the first dropped token lies above ``m``
    the nucleus is known.
  * when a case is not decided by the candidates (a flat distribution with top-p near 1,
    unsent ties) ``decide`` returns ``None`` and the caller gathers the whole logits and runs
    ``Sampler`` on them (the full-logits path): exact in every case, just slower.

  Decided cases sample from the kept candidates with ``softmax`` over them (the same
  numbers ``Sampler.probs`` forms; it normalises over the same set). A tie exactly at the
  top-p boundary is sent to the full-logits path too, because which of equal logits a sort
  puts first decides which one ``Sampler`` keeps.

Summaries are 1-D float64 tensors (fp32 logits and indices below 2**53 are exact in it):
``[start, stop, kind, …]`` (greedy: ``max, index``; sampling: ``lse, pre-drawn index, K,
largest unsent logit, K values, K indices``); the master checks that the ranges tile the vocabulary. A rank
may hold no rows (a group built with the whole head on the master): it sends an empty summary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from edgemesh.errors import ConfigError, EdgemeshError
from edgemesh.llm.sampling import Sampler, SamplingParams

CANDIDATES = 64  # per rank, at least: enough for the usual top-p nuclei of an LLM's next token
GREEDY, SAMPLE = 0.0, 1.0
_HEAD = 3  # start, stop, kind


class ChoiceError(EdgemeshError):
    """A rank's summary does not fit the others' (a plan whose vocabulary ranges do not tile)."""


@dataclass(frozen=True)
class Choice:
    """What every rank needs to summarise its slice for one step (travels in the step's meta)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    u: float = 0.0  # the uniform for the ranks' pre-drawn tokens

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def for_step(cls, sampler: Sampler) -> Choice:
        """Draws ``u`` from the request's generator (sampling only), so a seed fixes the run."""
        p = sampler.params
        if sampler.greedy:
            return cls()
        return cls(p.temperature, p.top_k, p.top_p, sampler.uniform(torch.float64))

    def to_meta(self) -> dict[str, Any]:
        return {"t": self.temperature, "k": self.top_k, "p": self.top_p, "u": self.u}

    @classmethod
    def from_meta(cls, d: Any) -> Choice:
        """Worker side: the master's choice parameters, checked (``EdgemeshError`` if bad)."""
        try:
            t, k, p, u = d["t"], d["k"], d["p"], d["u"]
            ok = (isinstance(t, (int, float)) and isinstance(k, int) and isinstance(p, (int, float))
                  and isinstance(u, (int, float)) and 0.0 <= u < 1.0 and math.isfinite(t))
            if ok:
                SamplingParams(float(t), k, float(p))  # the sampler's own checks
                return cls(float(t), k, float(p), float(u))
        except (KeyError, TypeError, ConfigError):
            pass
        raise EdgemeshError("bad choice parameters from the master")


def summarize(logits: torch.Tensor, start: int, choice: Choice) -> torch.Tensor:
    """This rank's summary of its slice ``logits`` [n] (global rows ``start..start+n``)."""
    n = logits.shape[-1]
    if n == 0:  # a rank without head rows (the whole head on the master)
        tail = [-math.inf, -1.0] + ([] if choice.greedy else [0.0, -math.inf])
        return torch.tensor([start, start, GREEDY if choice.greedy else SAMPLE, *tail], dtype=torch.float64)
    z = logits.to(torch.float32)
    if choice.greedy:
        i = int(torch.argmax(z))
        return torch.tensor([start, start + n, GREEDY, float(z[i]), start + i], dtype=torch.float64)
    z = z / choice.temperature  # the same fp32 op as Sampler.probs: the same values
    k = min(n, max(choice.top_k, CANDIDATES))
    vals, idx = torch.topk(z, min(n, k + 1))  # descending; one more: the largest logit not sent
    # The largest unsent logit (-inf if all were sent) tells the master whether an unsent token
    # could reach a top-k threshold or a top-p boundary.
    nxt = float(vals[k]) if k < n else -math.inf
    top = float(vals[0])
    if top == -math.inf:  # nothing possible in this slice (cannot happen with finite logits)
        lse, pick = -math.inf, 0
    else:
        e = torch.exp(z.to(torch.float64) - top)  # one pass: the slice's mass and its inverse CDF
        cdf = e.cumsum(0)
        total = float(cdf[-1])
        lse = top + math.log(total)
        pick = min(int(torch.searchsorted(cdf, choice.u * total, right=True)), n - 1)
        while pick > 0 and e[pick] == 0:  # never a token of probability 0 (rounding at the end)
            pick -= 1
    head = torch.tensor([start, start + n, SAMPLE, lse, start + pick, k, nxt], dtype=torch.float64)
    return torch.cat([head, vals[:k].to(torch.float64), (idx[:k] + start).to(torch.float64)])


def decide(parts: list[torch.Tensor], choice: Choice, sampler: Sampler, vocab_size: int) -> int | None:
    """Master: the token from every rank's summary (rank order), or None when the candidates
    do not decide it (then the caller samples from the gathered full logits)."""
    pos = 0
    for r, s in enumerate(parts):
        if s.dim() != 1 or s.numel() < _HEAD + 2 or int(s[0]) != pos or int(s[1]) < pos:
            raise ChoiceError(f"rank {r}'s vocabulary rows do not continue at row {pos}: the ranks "
                              "disagree about the vocabulary split; re-plan the group")
        if float(s[2]) != (GREEDY if choice.greedy else SAMPLE):
            raise ChoiceError(f"rank {r} summarised its logits for another kind of choice")
        pos = int(s[1])
    if pos != vocab_size:
        raise ChoiceError(f"the ranks' vocabulary rows end at {pos}, not {vocab_size}; re-plan the group")
    if choice.greedy:
        held = [r for r in range(len(parts)) if parts[r][1] > parts[r][0]]
        best = max(held, key=lambda r: (float(parts[r][3]), -r))  # ties: the lowest rank
        return int(parts[best][4])
    lse_r = torch.stack([s[3] for s in parts])
    sizes = [int(s[1] - s[0]) for s in parts]
    if choice.top_k == 0 and choice.top_p >= 1.0:
        w = torch.exp(lse_r - torch.logsumexp(lse_r, 0))
        cdf = w.cumsum(0)
        r = min(int(torch.searchsorted(cdf, sampler.uniform(torch.float64) * float(cdf[-1]), right=True)), len(parts) - 1)
        while w[r] == 0 and r > 0:
            r -= 1
        return int(parts[r][4])
    vals, idx, floor = [], [], -math.inf  # floor: the largest logit no rank sent
    for s, size in zip(parts, sizes):
        k = int(s[5])
        if k < min(size, 1) or k > size or s.numel() != 7 + 2 * k:
            raise ChoiceError("a rank sent a malformed candidate list")
        vals.append(s[7:7 + k])
        idx.append(s[7 + k:])
        floor = max(floor, float(s[6]))
    v = torch.cat(vals)
    i = torch.cat(idx)
    order = torch.argsort(v, descending=True, stable=True)
    v, i = v[order], i[order]
    keep = v.numel()
    if choice.top_k:
        if choice.top_k < vocab_size:
            kth = float(v[choice.top_k - 1])
            if floor >= kth:  # an unsent logit equals the threshold: it would be kept too
                return None
            keep = int((v >= kth).sum())
        log_z = torch.logsumexp(v[:keep], 0)  # the kept set is all known
        floor = -math.inf
    else:
        log_z = torch.logsumexp(lse_r, 0)
    if choice.top_p < 1.0:
        p = torch.exp(v[:keep] - log_z)
        before = p.cumsum(0) - p
        dropped = (before >= choice.top_p).nonzero()
        if dropped.numel() == 0:
            if floor > -math.inf:  # the nucleus may go on among unsent tokens
                return None
        else:
            j = int(dropped[0])
            if float(v[j]) <= floor or float(v[j]) == float(v[j - 1]):
                return None  # the boundary is among unsent tokens, or falls inside a tie
            keep = j
    probs = torch.softmax(v[:keep].to(torch.float32), 0)
    return int(i[sampler.draw(probs)])
