"""Next-token choice: greedy, or temperature + top-k + top-p with a seeded generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgemesh.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


class Sampler:
    """Owns its random generator, so one request's sampling never disturbs another's."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._gen = torch.Generator()
        if params.seed is not None:
            self._gen.manual_seed(params.seed)
        else:
            self._gen.seed()

    @property
    def greedy(self) -> bool:
        return self.params.temperature == 0.0

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: [V] for one position."""
        if self.greedy:
            return int(torch.argmax(logits.to(torch.float32)).item())
        return self.draw(self.probs(logits))

    def draw(self, probs: torch.Tensor) -> int:
        """One token from a distribution, with this request's generator."""
        return int(torch.multinomial(probs, 1, generator=self._gen).item())

    def uniform(self, dtype: torch.dtype = torch.float32) -> float:
        """One uniform number in [0, 1) from this request's generator (speculative acceptance;
        float64 for the distributed choice, whose inverse CDF must resolve tiny probabilities)."""
        return float(torch.rand((), generator=self._gen, dtype=dtype).item())

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution a sampled token is drawn from: temperature, then top-k, then top-p."""
        p = self.params
        logits = logits.to(torch.float32) / p.temperature
        if p.top_k and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
            # Drop tokens once the mass *before* them already reaches top_p (keeps at least one).
            drop = (cum - torch.softmax(sorted_logits, dim=-1)) >= p.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
        return torch.softmax(logits, dim=-1)
