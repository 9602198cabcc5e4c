"""OpenAI-compatible HTTP API: /v1/models, /v1/chat/completions, /v1/completions (SSE streaming).

Everything a client sends is validated here and refused with an OpenAI-style error object
(``{"error": {"message", "type", "param", "code"}}``) and a 4xx status; the server keeps
serving. Generation runs in the engine's compute thread, never on the event loop.

Exposure controls (see the README's security model): an optional API key, checked on every
request as ``Authorization: Bearer KEY`` (what the openai client sends) in constant time and
required whenever the server listens beyond loopback; a bound on requests admitted at once
(queued plus generating; past it: 429 with ``Retry-After``); a request body limit (413) and a
``max_tokens`` limit (400).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterator

from aiohttp import web

from edgemesh.errors import ConfigError, EdgemeshError
from edgemesh.llm.sampling import SamplingParams
from edgemesh.runtime.engine import ClusterUnavailable, Engine, GenEvent, GenRequest

log = logging.getLogger(__name__)

ROLES = {"system", "user", "assistant", "developer", "tool"}
MAX_BODY = 1024 * 1024  # a full 2048-token chat is ~10 KB of JSON; a megabyte leaves room for long histories
MAX_PENDING = 16  # requests admitted at once (one generates, the rest wait in the engine's queue)
API_KEY_ENV = "EDGEMESH_API_KEY"


@dataclass(frozen=True)
class ApiLimits:
    """What one client may ask of the server. ``max_tokens=None``: up to the context length."""

    api_key: str | None = None
    max_pending: int = MAX_PENDING
    max_body: int = MAX_BODY
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty; pass a non-empty --api-key or unset EDGEMESH_API_KEY")
        if self.max_pending < 1 or self.max_body < 1024 or (self.max_tokens is not None and self.max_tokens < 1):
            raise ConfigError("API limits: --max-pending must be >= 1, --max-body >= 1024 bytes, --max-tokens >= 1")


def is_loopback(host: str) -> bool:
    """True when ``host`` can only be reached from this machine (names other than localhost
    count as reachable: they may resolve to anything)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None) -> None:
    """Refuse to serve beyond loopback without an API key."""
    if api_key is None and not is_loopback(host):
        raise ConfigError(
            f"the API would listen on {host}, reachable from other machines, without a key: set one with "
            f"--api-key KEY or {API_KEY_ENV}=KEY (clients send 'Authorization: Bearer KEY'), or use --host 127.0.0.1")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def response(self) -> web.Response:
        return web.json_response(
            {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}},
            status=self.status)


def _num(body: dict[str, Any], key: str, kind: type, default: Any, lo: float | None = None, hi: float | None = None) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ApiError(400, f"'{key}' must be {'a number' if kind is float else 'an integer'}", key)
    if lo is not None and value < lo or hi is not None and value > hi:
        raise ApiError(400, f"'{key}' must be between {lo} and {hi}, got {value}", key)
    return kind(value)


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", "stop")


def _content_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


SWARM_MODEL = "swarm"


class ApiServer:
    def __init__(self, engine: Engine | None, model_name: str, limits: ApiLimits | None = None,
                 swarm: Callable[[str], Awaitable[dict[str, Any]]] | None = None, classifier: Any = None) -> None:
        """``engine``: the LLM served (None for a ViT-only server); ``classifier``: a ViT split
        deployment (``runtime.vit_deploy.VitDeployment``) answering ``POST /v1/classify``."""
        self.engine = engine
        self.classifier = classifier
        self.model_name = model_name
        # `model: "swarm"`: the question goes to the cluster's swarm (every member answers, the
        # members rank the answers) through this node's daemon; None = not offered.
        self.swarm = swarm
        self.limits = limits or ApiLimits()
        self._key = self.limits.api_key.encode() if self.limits.api_key is not None else None
        self.created = int(time.time())
        self.pending = 0  # requests admitted and not yet answered
        self.refused_busy = 0
        self._seconds_per_request = 1.0  # moving average, for Retry-After
        self.app = web.Application(client_max_size=self.limits.max_body, middlewares=[self._errors, self._auth])
        self.app.add_routes([
            web.get("/v1/models", self.models),
            web.get("/v1/models/{model}", self.model),
            web.post("/v1/chat/completions", self.chat),
            web.post("/v1/completions", self.completions),
            web.get("/health", self.health),
            web.post("/v1/classify", self.classify),
        ])

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except _Refused as exc:
            return exc.resp
        except web.HTTPRequestEntityTooLarge:
            return ApiError(413, f"the request body is over this server's limit of {self.limits.max_body} bytes",
                            code="request_too_large").response()
        except web.HTTPException as exc:
            if exc.status >= 400:
                return ApiError(exc.status, exc.reason or "error", code=str(exc.status)).response()
            raise
        except Exception:  # noqa: BLE001 — a bug must not take the server down
            log.exception("request failed")
            return ApiError(500, "internal server error", kind="server_error").response()

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self._key is not None:
            header = request.headers.get("Authorization", "")
            scheme, _, given = header.partition(" ")
            # compare_digest: the time taken does not tell how much of a guess was right.
            given_bytes = given.strip().encode("utf-8", "replace")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given_bytes, self._key):
                resp = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                code="invalid_api_key").response()
                resp.headers["WWW-Authenticate"] = 'Bearer realm="edgemesh"'
                return resp
        if request.content_length is not None and request.content_length > self.limits.max_body:
            # Refused from the header, before a byte of the body is read.
            raise ApiError(413, f"the request body ({request.content_length} bytes) is over this server's limit "
                                f"of {self.limits.max_body} bytes", code="request_too_large")
        return await handler(request)

    # ---- routes -------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "model": self.model_name,
                                  "queued": self.engine.queued if self.engine is not None else 0,
                                  "pending": self.pending, "refused_busy": self.refused_busy})

    def _model_obj(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "edgemesh"}

    async def models(self, request: web.Request) -> web.Response:
        extra = [{**self._model_obj(), "id": SWARM_MODEL}] if self.swarm is not None else []
        return web.json_response({"object": "list", "data": [self._model_obj(), *extra]})

    async def model(self, request: web.Request) -> web.Response:
        if request.match_info["model"] == SWARM_MODEL and self.swarm is not None:
            return web.json_response({**self._model_obj(), "id": SWARM_MODEL})
        if request.match_info["model"] != self.model_name:
            raise ApiError(404, f"the model '{request.match_info['model']}' does not exist", "model", "model_not_found")
        return web.json_response(self._model_obj())

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json(loads=json.loads)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError(400, "'model' is required", "model")
        if model != self.model_name and not (model == SWARM_MODEL and self.swarm is not None):
            raise ApiError(404, f"the model '{model}' does not exist; this server has '{self.model_name}'",
                           "model", "model_not_found")
        if body.get("n", 1) != 1:
            raise ApiError(400, "only n = 1 is supported", "n")
        return body

    def _request(self, body: dict[str, Any], prompt_ids: list[int], default_max: int | None) -> GenRequest:
        ctx = self.engine.context_length
        room = ctx - len(prompt_ids)
        if room <= 0:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; this model's context is {ctx}",
                           "messages", "context_length_exceeded")
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        limit = self.limits.max_tokens
        fallback = room if default_max is None else default_max
        max_tokens = _num(body, key, int, fallback if limit is None else min(fallback, limit), lo=0)
        if limit is not None and max_tokens > limit:
            raise ApiError(400, f"{key} ({max_tokens}) is over this server's limit of {limit}", key,
                           "max_tokens_limit")
        if max_tokens > room:
            raise ApiError(400, f"prompt ({len(prompt_ids)} tokens) + {key} ({max_tokens}) exceeds this "
                                f"model's context of {ctx} tokens", key, "context_length_exceeded")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ApiError(400, "'seed' must be an integer", "seed")
        try:
            params = SamplingParams(
                temperature=_num(body, "temperature", float, 1.0, 0.0, 2.0),
                top_p=_num(body, "top_p", float, 1.0, 0.0, 1.0),
                top_k=_num(body, "top_k", int, 0, 0),
                seed=seed,
            )
        except ConfigError as exc:
            raise ApiError(400, str(exc)) from None
        return GenRequest(prompt_ids, max_tokens, params, _stops(body))

    def _need_engine(self) -> None:
        if self.engine is None:
            raise ApiError(404, f"this server serves the image classifier '{self.model_name}': POST /v1/classify",
                           "model", "model_not_found")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        with self._admitted():
            if body["model"] == SWARM_MODEL:
                return await self._swarm_chat(request, body)
            self._need_engine()
            return await self._chat(request, body)

    async def classify(self, request: web.Request) -> web.Response:
        """Images in, classes out: multipart files (PNG/JPEG), or JSON {"images": [base64, ...]}
        or {"arrays": [[...]]} (pixels in the model's layout). Bad images get a 4xx naming why."""
        if self.classifier is None:
            raise ApiError(404, f"this server serves the language model '{self.model_name}', not an image classifier",
                           code="model_not_found")
        from edgemesh.errors import ImageError
        from edgemesh.vit.images import decode_array, decode_batch

        config = self.classifier.config
        with self._admitted():
            try:
                if request.content_type.startswith("multipart/"):
                    items = []
                    reader = await request.multipart()
                    async for part in reader:
                        items.append(bytes(await part.read()))
                    batch = await asyncio.to_thread(decode_batch, items, config)
                else:
                    body = await request.json(loads=json.loads) if request.can_read_body else None
                    if isinstance(body, dict) and isinstance(body.get("images"), list):
                        import base64
                        import binascii

                        try:
                            items = [base64.b64decode(x, validate=True) for x in body["images"] if isinstance(x, str)]
                        except (binascii.Error, ValueError):
                            raise ApiError(400, "'images' must be base64 strings", "images") from None
                        if len(items) != len(body["images"]):
                            raise ApiError(400, "'images' must be base64 strings", "images")
                        batch = await asyncio.to_thread(decode_batch, items, config)
                    elif isinstance(body, dict) and "arrays" in body:
                        batch = await asyncio.to_thread(decode_array, body["arrays"], config)
                    else:
                        raise ApiError(400, "send images as multipart files, or JSON with 'images' (base64) or 'arrays'")
            except ImageError as exc:
                raise ApiError(exc.http_status, str(exc), code="invalid_image") from None
            except json.JSONDecodeError:
                raise ApiError(400, "the request body is not valid JSON") from None
            try:
                result = await self.classifier.classify(batch)
            except EdgemeshError as exc:
                raise ApiError(503, f"the classifier could not answer: {exc}", kind="server_error",
                               code="cluster_unavailable") from None
        labels = self.classifier.labels
        data = []
        for i, row in enumerate(result.probs):
            top = row.topk(min(5, row.numel()))
            data.append({"index": i, "class": int(top.indices[0]), "label": _label(labels, int(top.indices[0])),
                         "probability": float(top.values[0]),
                         "top": [{"class": int(c), "label": _label(labels, int(c)), "probability": float(p)}
                                 for p, c in zip(top.values, top.indices)]})
        return web.json_response({"object": "classification", "model": self.model_name, "data": data,
                                  "missing_parts": result.missing,
                                  "timings": {"ms": result.seconds * 1000, "parts_ms": result.parts_ms}})

    async def _swarm_chat(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        """The last user message goes to the swarm; the winning answer comes back as the
        assistant's message, with the round (scores, judgments, who was left out) under "swarm"."""
        assert self.swarm is not None
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", "messages")
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise ApiError(400, "the swarm answers the last user message; there is none", "messages")
        question = _content_text(users[-1].get("content", ""), messages.index(users[-1]))
        try:
            result = await self.swarm(question)
        except EdgemeshError as exc:
            raise ApiError(503, f"the swarm could not answer: {exc}", kind="server_error",
                           code="swarm_unavailable") from None
        text = result.get("answer") or ""
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        if not body.get("stream"):
            return web.json_response({
                "id": rid, "object": "chat.completion", "created": created, "model": SWARM_MODEL,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": "stop"}], "usage": usage, "swarm": result})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": SWARM_MODEL}
        for delta, finish in (({"role": "assistant", "content": text}, None), ({}, "stop")):
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await resp.write(b"data: " + json.dumps({**base, "choices": [], "swarm": result}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _chat(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", "messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise ApiError(400, f"messages[{i}] needs a role among {sorted(ROLES)}", f"messages[{i}]")
            clean.append({"role": "system" if m["role"] == "developer" else m["role"],
                          "content": _content_text(m.get("content", ""), i)})
        prompt_ids = await asyncio.to_thread(self.engine.tokenizer.encode_chat, clean)
        gen = self._request(body, prompt_ids, None)
        return await self._respond(request, body, gen, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        self._need_engine()
        with self._admitted():
            return await self._completions(request, body)

    async def _completions(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' must be a non-empty string", "prompt")
        prompt_ids = await asyncio.to_thread(self.engine.tokenizer.encode, prompt)
        if not prompt_ids:
            raise ApiError(400, "the prompt encodes to no tokens", "prompt")
        gen = self._request(body, prompt_ids, 16)
        return await self._respond(request, body, gen, chat=False)

    # ---- generation ---------------------------------------------------------------
    @contextlib.contextmanager
    def _admitted(self) -> Iterator[None]:
        """Hold a place among the requests being served (taken before tokenizing, so a full
        server refuses cheaply), or refuse with 429 and an estimate of when one frees up
        (requests ahead × the recent time per request)."""
        if self.pending >= self.limits.max_pending:
            self.refused_busy += 1
            wait = min(max(math.ceil(self._seconds_per_request * (self.pending - self.limits.max_pending + 1)), 1), 60)
            err = ApiError(429, f"the server is busy ({self.pending} requests queued or running); retry in {wait} s",
                           code="rate_limit_exceeded", kind="rate_limit_error")
            resp = err.response()
            resp.headers["Retry-After"] = str(wait)
            raise _Refused(resp)
        self.pending += 1
        started = time.monotonic()
        try:
            yield
        finally:
            self.pending -= 1
            self._seconds_per_request = 0.8 * self._seconds_per_request + 0.2 * (time.monotonic() - started)

    async def _respond(self, request: web.Request, body: dict[str, Any], gen: GenRequest, chat: bool) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[GenEvent] = asyncio.Queue()
        self.engine.submit(gen, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        try:
            if body.get("stream"):
                return await self._stream(request, body, gen, events, rid, created, chat)
            return await self._whole(events, rid, created, chat)
        finally:
            gen.cancel.set()  # the client went away or we are done: stop generating

    async def _whole(self, events: asyncio.Queue[GenEvent], rid: str, created: int, chat: bool) -> web.Response:
        parts: list[str] = []
        while True:
            ev = await events.get()
            if ev.error is not None:
                raise _as_api_error(ev.error)
            parts.append(ev.text)
            if ev.done:
                break
        text = "".join(parts)
        usage = _usage(ev)
        finish = "stop" if ev.finish_reason == "stop" else "length"
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return web.json_response({"id": rid, "object": obj, "created": created, "model": self.model_name,
                                  "choices": [choice], "usage": usage,
                                  "timings": {"ttft_s": ev.ttft_s, "s_per_token": ev.decode_s}})

    async def _stream(self, request: web.Request, body: dict[str, Any], gen: GenRequest,
                      events: asyncio.Queue[GenEvent], rid: str, created: int, chat: bool) -> web.StreamResponse:
        # The first event decides the status: an early failure is still a proper 4xx/5xx.
        first = await events.get()
        if first.error is not None:
            raise _as_api_error(first.error)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        obj = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if isinstance(body.get("stream_options"), dict) else False

        async def send(payload: dict[str, Any]) -> None:
            await resp.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

        def chunk(text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if text:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": obj, "created": created, "model": self.model_name, "choices": [choice]}

        if chat:
            await send(chunk(None, None, role=True))
        ev = first
        while True:
            if ev.error is not None:
                await send({"error": {"message": str(ev.error), "type": "server_error", "param": None,
                                      "code": "cluster_unavailable" if isinstance(ev.error, ClusterUnavailable) else None}})
                break
            if ev.text:
                await send(chunk(ev.text, None))
            if ev.done:
                await send(chunk(None, "stop" if ev.finish_reason == "stop" else "length"))
                if include_usage:
                    await send({"id": rid, "object": obj, "created": created, "model": self.model_name, "choices": [],
                                "usage": _usage(ev)})
                break
            ev = await events.get()
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


class _Refused(Exception):
    """A ready response (with extra headers) that ends the request."""

    def __init__(self, resp: web.Response) -> None:
        super().__init__("refused")
        self.resp = resp


def _as_api_error(exc: Exception) -> ApiError:
    if isinstance(exc, ClusterUnavailable):
        return ApiError(503, str(exc), code="cluster_unavailable", kind="server_error")
    if isinstance(exc, ConfigError):
        return ApiError(400, str(exc))
    return ApiError(500, f"generation failed: {exc}", kind="server_error")


async def serve(server: ApiServer, host: str, port: int, ready: asyncio.Event | None = None) -> None:
    """Serve until cancelled."""
    check_exposure(host, server.limits.api_key)
    runner = web.AppRunner(server.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        from edgemesh.errors import PortInUseError

        raise PortInUseError(f"cannot serve on {host}:{port}: {exc.strerror}; pick another --port") from None
    if ready is not None:
        ready.set()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def _usage(ev: GenEvent) -> dict[str, Any]:
    """OpenAI's usage block, plus what speculative decoding proposed and got accepted."""
    usage: dict[str, Any] = {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                             "total_tokens": ev.prompt_tokens + ev.completion_tokens}
    if ev.speculative is not None:
        usage["speculative"] = dict(ev.speculative)
    return usage


def _label(labels: tuple[str, ...], c: int) -> str:
    return labels[c] if c < len(labels) else str(c)
