"""One RPC dispatcher for every transport: authorise, run the handler, turn its result or its
error into a typed reply; plus the request log that answers a re-sent request from its cache.

A transport hands the dispatcher a decoded envelope and the caller's proven key (the ZAP
User-Id of a zmq link, the bound node key of an ICE channel) and gets back the reply already
encoded the way it sends things, or ``None`` when nothing is to be sent (a notify).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Generic, Sequence, TypeVar

from edgemesh.errors import EdgemeshError, ProtocolError, RpcError, RpcTimeout
from edgemesh.wire.envelope import Envelope, Kind
from edgemesh.wire.tensor import TensorSpec

log = logging.getLogger(__name__)

MAX_INFLIGHT = 256  # handler tasks per server; more are refused with "busy"
SERVED_CACHE = 4096  # replies remembered by request id, for transports that re-send

T = TypeVar("T")
Tensors = list[tuple[TensorSpec, memoryview]]


@dataclass
class Call:
    """One incoming request or notify, as a handler sees it."""

    peer_key: bytes  # z85 CURVE key proven by the link
    method: str
    body: Any
    tensors: Tensors


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

    async def serve(self, peer_key: bytes, env: Envelope, tensors: Tensors, encode: Encode[T]) -> T | None:
        method = env.method
        handler = self.handlers.get(method)
        if handler is None or not self.authorize(peer_key, method):
            self.stats.refused += 1
            return self.error(env, "unknown_method", f"no method '{method}' here", encode)
        self.stats.by_method[method] = self.stats.by_method.get(method, 0) + 1
        try:
            result = await handler(Call(peer_key, method, env.body, tensors))
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
    """Recent request ids and their replies: at-least-once delivery becomes exactly-once handling."""

    def __init__(self, size: int = SERVED_CACHE) -> None:
        self.size = size
        self._served: OrderedDict[int, T | None] = OrderedDict()

    def admit(self, rid: int) -> tuple[bool, T | None]:
        """``(True, None)`` for a new request (now remembered as running); ``(False, reply)`` for
        a repeat, ``reply`` being ``None`` while the first one still runs."""
        if rid in self._served:
            return False, self._served[rid]
        self._served[rid] = None
        while len(self._served) > self.size:
            self._served.popitem(last=False)
        return True, None

    def answered(self, rid: int, reply: T) -> None:
        if rid in self._served:
            self._served[rid] = reply


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
