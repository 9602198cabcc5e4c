"""The engine continues a request across a cluster failure (re-plan + resume) or fails it."""

from __future__ import annotations

import threading

import pytest
import torch

from edgemesh.llm.sampling import SamplingParams
from edgemesh.runtime.engine import ClusterUnavailable, Engine, GenEvent, GenRequest

pytestmark = pytest.mark.unit

VOCAB = 26


class Lost(Exception):
    """Stands in for the collective's PeerLost."""


class CountingModel:
    """Next token = (sum of the whole sequence so far) mod VOCAB — so a resumed request only
    matches an uninterrupted one if the resumed prefill really contains prompt + tokens so
    far. Raises ``Lost`` on forward call number ``fail_at`` (1-based)."""

    max_seq_len = 512

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at
        self.calls = 0
        self.seq: list[int] = []

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, *, last_only: bool = False) -> torch.Tensor:
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise Lost(f"rank 2 lost at call {self.calls}")
        ids = tokens[0].tolist()
        self.seq = ids if start_pos == 0 else self.seq[:start_pos] + ids
        logits = torch.zeros(1, 1, VOCAB)
        logits[0, 0, sum(self.seq) % VOCAB] = 1.0
        return logits


class Letters:
    def stop_ids(self) -> set[int]:
        return set()

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + i) for i in ids)


def run(engine: Engine, prompt: list[int], n: int, params: SamplingParams | None = None) -> tuple[str, GenEvent]:
    events: list[GenEvent] = []
    done = threading.Event()

    def sink(ev: GenEvent) -> None:
        events.append(ev)
        if ev.done:
            done.set()

    engine.submit(GenRequest(prompt, n, params or SamplingParams()), sink)
    assert done.wait(10)
    return "".join(e.text for e in events), events[-1]


def make(model: CountingModel, recover, resume: bool = True) -> Engine:  # type: ignore[no-untyped-def]
    return Engine("m", model, Letters(), recover=recover, is_cluster_failure=lambda e: isinstance(e, Lost),
                  resume=resume)  # type: ignore[arg-type]


def test_a_failure_mid_request_is_resumed_on_the_recovered_model_with_the_same_output():
    prompt = [3, 1, 4]
    clean = make(CountingModel(), recover=None)
    try:
        want, _ = run(clean, prompt, 20)
    finally:
        clean.close()
    recovered: list[Exception] = []

    def recover(exc: Exception) -> CountingModel:
        recovered.append(exc)
        return CountingModel()

    eng = make(CountingModel(fail_at=8), recover)
    try:
        text, last = run(eng, prompt, 20)
        assert [str(e) for e in recovered] == ["rank 2 lost at call 8"]
        assert (text, last.finish_reason, last.completion_tokens, last.error) == (want, "length", 20, None)
        assert eng.resumed == 1
        again, _ = run(eng, prompt, 20)  # the engine goes on with the recovered model
        assert again == want
    finally:
        eng.close()


def test_sampled_requests_continue_the_same_random_stream():
    params = SamplingParams(temperature=1.0, seed=7)

    class Noisy(CountingModel):
        def forward(self, tokens, start_pos=0, *, last_only=False):  # type: ignore[no-untyped-def]
            super().forward(tokens, start_pos, last_only=last_only)
            return torch.linspace(0.0, 1.0, VOCAB).view(1, 1, VOCAB)  # many plausible tokens

    clean = make(Noisy(), recover=None)
    try:
        want, _ = run(clean, [1], 30, params)
    finally:
        clean.close()
    eng = make(Noisy(fail_at=12), recover=lambda exc: Noisy())
    try:
        got, _ = run(eng, [1], 30, params)
    finally:
        eng.close()
    assert got == want


def test_without_resume_or_when_recovery_fails_the_request_gets_cluster_unavailable():
    eng = make(CountingModel(fail_at=5), recover=lambda exc: CountingModel(), resume=False)
    try:
        text, last = run(eng, [2], 20)
        assert isinstance(last.error, ClusterUnavailable) and eng.resumed == 0
        assert len(text) == 4  # what was streamed before the failure stays streamed
        _, ok = run(eng, [2], 5)  # recovered before the next request
        assert ok.error is None and ok.completion_tokens == 5
    finally:
        eng.close()

    def broken(exc: Exception) -> CountingModel:
        raise RuntimeError("no device can hold the model")

    eng = make(CountingModel(fail_at=5), broken)
    try:
        _, last = run(eng, [2], 20)
        assert isinstance(last.error, ClusterUnavailable)
        assert "no device can hold the model" in str(last.error)
        _, nxt = run(eng, [2], 5)  # still broken: the next request says so too, quickly
        assert isinstance(nxt.error, ClusterUnavailable)
    finally:
        eng.close()
