"""One RPC dispatcher for every transport: authorise, run the handler, turn its result or its
error into a typed reply; plus the request log that answers a re-sent request from its cache.

A transport hands the dispatcher a decoded envelope and the caller's proven key (the ZAP
User-Id of a zmq link, the bound node key of an ICE channel) and gets back the reply already
encoded the way it sends things, or ``None`` when nothing is to be sent (a notify).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Generic, Sequence, TypeVar

from edgemesh.errors import EdgemeshError, ProtocolError, RpcError, RpcTimeout
from edgemesh.wire.envelope import Envelope, Kind
from edgemesh.wire.tensor import TensorSpec

log = logging.getLogger(__name__)

MAX_INFLIGHT = 256  # handler tasks per server; more are refused with "busy"
# Replies remembered by request id, for transports that re-send (per peer): at most this many
# ids, this many bytes of replies, and each for this long. A re-send follows a path failing
# over (seconds), so a minute covers it; a reply larger than the whole budget is not kept.
SERVED_CACHE = 4096
SERVED_BYTES = 8 * 1024 * 1024
SERVED_SECONDS = 60.0

T = TypeVar("T")
Tensors = list[tuple[TensorSpec, memoryview]]


@dataclass
class Call:
    """One incoming request or notify, as a handler sees it."""

    peer_key: bytes  # z85 CURVE key proven by the link
    method: str
    body: Any
    tensors: Tensors
    source: str = ""  # the peer's network address where the transport knows it (zmq: Peer-Address)


@dataclass
class Reply:
    body: Any = None
    tensors: Sequence[tuple[TensorSpec, Any]] = ()


Handler = Callable[[Call], Awaitable[Any]]  # returns a body, a Reply, or None
Authorize = Callable[[bytes, str], bool]  # (caller's CURVE key, method) -> may it call?
Encode = Callable[[Envelope, Sequence[Any]], T]  # envelope + tensor buffers -> what the transport sends


@dataclass
class RpcStats:
    received: int = 0
    protocol_errors: int = 0
    internal_errors: int = 0
    refused: int = 0
    by_method: dict[str, int] = field(default_factory=dict)


def allow_all(key: bytes, method: str) -> bool:
    return True


class Dispatcher:
    """Serves one handler table. ``handlers`` is kept by reference: a daemon may fill it later."""

    def __init__(self, sender: bytes, handlers: dict[str, Handler], stats: RpcStats,
                 authorize: Authorize = allow_all) -> None:
        self.sender = sender
        self.handlers = handlers
        self.stats = stats
        self.authorize = authorize

    async def serve(self, peer_key: bytes, env: Envelope, tensors: Tensors, encode: Encode[T],
                    source: str = "") -> T | None:
        method = env.method
        handler = self.handlers.get(method)
        if handler is None or not self.authorize(peer_key, method):
            self.stats.refused += 1
            return self.error(env, "unknown_method", f"no method '{method}' here", encode)
        self.stats.by_method[method] = self.stats.by_method.get(method, 0) + 1
        try:
            result = await handler(Call(peer_key, method, env.body, tensors, source))
        except ProtocolError as exc:
            self.stats.protocol_errors += 1
            return self.error(env, "bad_request", str(exc), encode)
        except RpcError as exc:
            return self.error(env, exc.code, str(exc), encode)
        except EdgemeshError as exc:
            return self.error(env, type(exc).__name__, str(exc), encode)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.stats.internal_errors += 1
            log.exception("handler %s failed", method)
            return self.error(env, "internal", "internal error", encode)
        if env.kind == Kind.NOTIFY:
            return None
        reply = result if isinstance(result, Reply) else Reply(result)
        out = Envelope(Kind.REPLY, method, env.rid, self.sender, reply.body, tuple(s for s, _ in reply.tensors))
        try:
            return encode(out, [b for _, b in reply.tensors])
        except ProtocolError as exc:
            return self.error(env, "internal", f"unencodable reply: {exc}", encode)

    def error(self, env: Envelope, code: str, message: str, encode: Encode[T]) -> T | None:
        """The error reply to a request (a notify gets none)."""
        if env.kind != Kind.REQUEST:
            return None
        out = Envelope(Kind.ERROR, env.method, env.rid, self.sender, {"code": code, "message": message[:500]})
        return encode(out, [])


class RequestLog(Generic[T]):
    """Recent request ids and their replies: at-least-once delivery becomes exactly-once handling.

    Bounded in ids (``size``), reply bytes (``max_bytes``, as ``weigh`` counts them) and time
    (``ttl`` seconds after the answer). What falls out is forgotten: a later re-send of it runs
    again, as it did when only the count was bounded."""

    def __init__(self, size: int = SERVED_CACHE, max_bytes: int = SERVED_BYTES, ttl: float = SERVED_SECONDS,
                 weigh: Callable[[T], int] = len, now: Callable[[], float] = time.monotonic) -> None:  # type: ignore[assignment]
        self.size, self.max_bytes, self.ttl = size, max_bytes, ttl
        self.weigh, self.now = weigh, now
        self._running: OrderedDict[int, None] = OrderedDict()
        self._answered: OrderedDict[int, tuple[T, int, float]] = OrderedDict()  # rid -> (reply, bytes, when)
        self.bytes = 0  # reply bytes held now

    def __len__(self) -> int:
        return len(self._running) + len(self._answered)

    def admit(self, rid: int) -> tuple[bool, T | None]:
        """``(True, None)`` for a new request (now remembered as running); ``(False, reply)`` for
        a repeat, ``reply`` being ``None`` while the first one still runs."""
        self._trim()
        if rid in self._running:
            return False, None
        if rid in self._answered:
            return False, self._answered[rid][0]
        self._running[rid] = None
        self._trim()
        return True, None

    def answered(self, rid: int, reply: T) -> None:
        if rid not in self._running:
            return
        del self._running[rid]
        size = self.weigh(reply)
        if size > self.max_bytes:
            return  # too big to keep: a re-send of it runs again
        self._answered[rid] = (reply, size, self.now())
        self.bytes += size
        self._trim()

    def _trim(self) -> None:
        """Oldest answers out first (expired, then over the byte or id budget), then the
        oldest running ids if still over the id budget."""
        deadline = self.now() - self.ttl
        while self._answered:
            rid, (_, size, when) = next(iter(self._answered.items()))
            if when >= deadline and self.bytes <= self.max_bytes and len(self) <= self.size:
                break
            del self._answered[rid]
            self.bytes -= size
        while len(self._running) > self.size:
            self._running.popitem(last=False)


async def answer(method: str, fut: asyncio.Future[Any], timeout: float,
                 sending: Awaitable[Any] | None = None) -> Any:
    """A caller's wait: for ``sending`` (a send that had to wait for the link), then for the
    reply, each within ``timeout``; ``RpcTimeout`` when either takes longer."""
    try:
        if sending is not None:
            await asyncio.wait_for(sending, timeout)
        return await asyncio.wait_for(fut, timeout)
    except asyncio.TimeoutError:
        raise RpcTimeout(f"{method}: no answer within {timeout:g} s") from None


def settle(fut: asyncio.Future[Any], env: Envelope, views: Sequence[memoryview]) -> bool:
    """Resolve a caller's future with a REPLY or an ERROR; False for any other kind."""
    if env.kind == Kind.REPLY:
        fut.set_result((env.body, list(zip(env.tensors, views))))
    elif env.kind == Kind.ERROR:
        body = env.body if isinstance(env.body, dict) else {}
        fut.set_exception(RpcError(str(body.get("message", "remote error")), str(body.get("code", "error"))))
    else:
        return False
    return True
