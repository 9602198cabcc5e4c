"""The serving engine: one compute thread that runs generation requests one at a time.

The HTTP layer (asyncio) never touches torch; it submits a request and receives events
through a callback. Requests queue in arrival order, so concurrent requests cannot corrupt each
other's KV cache. When the model raises a cluster failure (a worker died), the engine calls
``recover`` (re-plan over the devices left, rebuild) and, with ``resume`` on, continues the
request where it stopped: it prefills prompt + the tokens generated so far on the new cluster
and goes on with the same sampler, so a streaming client sees one uninterrupted answer (greedy
output is the same as without the failure). With ``resume`` off, or when recovery fails, the
request fails with ``ClusterUnavailable`` (HTTP 503) and the next one triggers recovery.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

from edgemesh.errors import EdgemeshError
from edgemesh.llm.generate import generate
from edgemesh.llm.sampling import Sampler, SamplingParams
from edgemesh.llm.speculate import AdaptiveK, Proposer, SpecStats, speculative_generate
from edgemesh.llm.tokenizer import ChatTokenizer, StreamDecoder

log = logging.getLogger(__name__)


class ClusterUnavailable(EdgemeshError):
    """A participant of the model failed; the request cannot finish (HTTP 503)."""


class _RecoveryFailed(Exception):
    """Resuming a request needed a re-plan, and the re-plan failed (``__cause__``)."""

    def __init__(self, failure: Exception) -> None:
        super().__init__(str(failure))
        self.failure = failure


class Model(Protocol):
    max_seq_len: int


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class GenEvent:
    text: str = ""
    done: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Exception | None = None
    ttft_s: float | None = None
    decode_s: float | None = None
    speculative: dict[str, int] | None = None  # {"proposed", "accepted", "steps"} when speculating


class StopMatcher:
    """Cuts the text at the first stop string, holding back a tail that might start one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        text = self._pending + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._pending = ""
            return text[: min(hits)], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        self._pending = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        rest, self._pending = self._pending, ""
        return rest


class Engine:
    def __init__(
        self,
        name: str,
        model: Model,
        tokenizer: ChatTokenizer,
        recover: Callable[[Exception], Model] | None = None,
        is_cluster_failure: Callable[[Exception], bool] = lambda exc: False,
        on_idle: Callable[[Model], None] | None = None,
        idle_interval: float = 1.0,
        resume: bool = True,
        max_resumes: int = 2,
        prepare_thread: Callable[[], None] | None = None,
        proposer: Callable[[], Proposer] | None = None,
        spec_k_max: int = 8,
    ) -> None:
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.recover, self.is_cluster_failure = recover, is_cluster_failure
        self.on_idle, self.idle_interval = on_idle, idle_interval
        self.resume = resume and recover is not None
        self.max_resumes = max_resumes
        self.resumed = 0  # requests continued after a failure (for status and tests)
        # Called on the compute thread at start and after every recovery (CPU pinning).
        self.prepare_thread = prepare_thread or (lambda: None)
        self.stop_ids = tokenizer.stop_ids()
        # A fresh proposer per request (speculative decoding, llm/speculate.py); None = plain.
        self.proposer = proposer
        self.spec_k_max = spec_k_max
        self._queue: queue.Queue[tuple[GenRequest, Callable[[GenEvent], None]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="edgemesh-engine", daemon=True)
        self._broken: Exception | None = None
        self.served = 0
        self._thread.start()

    @property
    def context_length(self) -> int:
        return self.model.max_seq_len

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def submit(self, request: GenRequest, sink: Callable[[GenEvent], None]) -> None:
        self._queue.put((request, sink))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    # ---- compute thread ----------------------------------------------------------
    def _loop(self) -> None:
        self.prepare_thread()
        while True:
            try:
                item = self._queue.get(timeout=self.idle_interval)
            except queue.Empty:
                self._idle()
                continue
            if item is None:
                return
            request, sink = item
            if self._broken is not None:
                self._recover()
            if self._broken is not None:
                sink(GenEvent(done=True, error=ClusterUnavailable(
                    f"the cluster cannot serve this model right now: {self._broken}")))
                continue
            if request.cancel.is_set():
                sink(GenEvent(done=True, finish_reason="cancelled", prompt_tokens=len(request.prompt_ids)))
                continue
            try:
                self._run(request, sink)
            except _RecoveryFailed as exc:
                sink(GenEvent(done=True, error=ClusterUnavailable(
                    f"a device of the cluster failed during this request ({exc.failure}) and re-planning "
                    f"over the remaining devices failed too ({exc.__cause__}); retry later")))
            except Exception as exc:  # noqa: BLE001 — every failure must reach the client
                if self.is_cluster_failure(exc):
                    log.error("a participant failed during a request: %s", exc)
                    self._broken = exc
                    sink(GenEvent(done=True, error=ClusterUnavailable(
                        f"a device of the cluster failed during this request ({exc}); "
                        "the model is being re-planned over the remaining devices, retry shortly")))
                else:
                    log.exception("generation failed")
                    sink(GenEvent(done=True, error=exc))

    def _idle(self) -> None:
        """Keep-alive while idle; a failure found here is recovered before any request sees it."""
        if self.on_idle is None:
            return
        if self._broken is not None:
            self._recover()
            return
        try:
            self.on_idle(self.model)
        except Exception as exc:  # noqa: BLE001
            if not self.is_cluster_failure(exc):
                raise
            log.error("a participant failed while idle: %s", exc)
            self._broken = exc
            self._recover()

    def _recover(self) -> None:
        exc, self._broken = self._broken, None
        if self.recover is None or exc is None:
            return
        try:
            self.model = self.recover(exc)
            self.prepare_thread()
            log.info("recovered: the model runs again")
        except Exception as rexc:  # noqa: BLE001
            log.exception("re-planning failed")
            self._broken = rexc

    def _tokens(self, request: GenRequest, stats: SpecStats | None = None) -> Iterator[int]:
        """The request's new tokens; across a cluster failure when resuming is on."""
        sampler = Sampler(request.params)
        proposer = self.proposer() if self.proposer is not None and stats is not None else None
        k = AdaptiveK(k=min(4, self.spec_k_max), k_max=self.spec_k_max)
        done: list[int] = []
        resumes = 0
        while True:
            prompt, left = request.prompt_ids + done, request.max_tokens - len(done)
            if proposer is not None:
                tokens = speculative_generate(self.model, prompt, left, proposer, self.stop_ids,  # type: ignore[arg-type]
                                              sampler=sampler, k=k, stats=stats)
            else:
                tokens = generate(self.model, prompt, left, stop_ids=self.stop_ids, sampler=sampler)  # type: ignore[arg-type]
            try:
                for tok in tokens:
                    done.append(tok)
                    yield tok
                return
            except Exception as exc:
                if not (self.resume and resumes < self.max_resumes and self.is_cluster_failure(exc)):
                    raise
                resumes += 1
                log.error("a participant failed after %d token(s) of a request: %s; re-planning and resuming",
                          len(done), exc)
                t = time.monotonic()
                try:
                    assert self.recover is not None
                    self.model = self.recover(exc)
                    self.prepare_thread()
                except Exception as rexc:
                    log.exception("re-planning failed")
                    self._broken = rexc
                    raise _RecoveryFailed(exc) from rexc
                self.resumed += 1
                log.warning("re-planned in %.1f s; resuming the request", time.monotonic() - t)

    def _run(self, request: GenRequest, sink: Callable[[GenEvent], None]) -> None:
        decoder = StreamDecoder(self.tokenizer)
        stopper = StopMatcher(request.stop)
        n = 0
        t0 = time.perf_counter()
        first: float | None = None
        finish = "length"
        hit = False
        stats = SpecStats() if self.proposer is not None else None
        for tok in self._tokens(request, stats):
            n += 1
            if first is None:
                first = time.perf_counter()
            if tok in self.stop_ids:
                finish = "stop"
                break
            text, hit = stopper.push(decoder.push(tok))
            if text:
                sink(GenEvent(text=text, completion_tokens=n))
            if hit:
                finish = "stop"
                break
            if request.cancel.is_set():
                finish = "cancelled"
                break
        if not hit:
            # Text held back as a possible stop-string prefix that never completed.
            rest = stopper.flush()
            if rest:
                sink(GenEvent(text=rest, completion_tokens=n))
        end = time.perf_counter()
        self.served += 1
        sink(GenEvent(done=True, finish_reason=finish, prompt_tokens=len(request.prompt_ids), completion_tokens=n,
                      ttft_s=None if first is None else first - t0,
                      decode_s=None if first is None or n < 2 else (end - first) / (n - 1),
                      speculative=None if stats is None else
                      {"proposed": stats.proposed, "accepted": stats.accepted, "steps": stats.steps}))
