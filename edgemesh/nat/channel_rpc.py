"""RPC with one peer over its current ICE channel: the same envelopes and semantics as zmq.

Handlers, authorization and error replies match ``mesh.rpc.RpcServer``, so the daemon serves a
peer identically on any path. The peer's identity is the CURVE key of the member whose node key
signed the channel's hello (the channel equivalent of the ZAP User-Id).

Channels come and go (relayed -> punched, or a punched path breaking and falling back to the
relay). Requests outlive them: a request not yet answered is re-sent on the next channel with
the *same* rid, and the serving side remembers recent rids, answering a repeat from its cache
instead of running the handler twice. That is at-least-once delivery with dedup by rid.
Request ids start at a random point so that a restarted peer never collides with the cache.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections import OrderedDict
from typing import Any, Awaitable, Callable, Sequence

from edgemesh.errors import EdgemeshError, ProtocolError, RpcError, RpcTimeout
from edgemesh.mesh.rpc import Call, Reply, RpcStats
from edgemesh.nat.framing import decode_frames, encode_frames
from edgemesh.wire.envelope import Envelope, Kind, decode_message, encode_message
from edgemesh.wire.tensor import TensorSpec

log = logging.getLogger(__name__)

Handler = Callable[[Call], Awaitable[Any]]
Authorize = Callable[[bytes, str], bool]
KEEPALIVE = "nat.keepalive"  # a notify answered by nobody: it only proves the path is alive
SERVED_CACHE = 4096
MAX_INFLIGHT = 256


class Sender:
    """What a ChannelRpc needs from a channel."""

    async def send(self, message: bytes) -> None: ...


class ChannelRpc:
    def __init__(self, sender: bytes, handlers: dict[str, Handler], authorize: Authorize, stats: RpcStats) -> None:
        self.sender = sender
        self.handlers = handlers
        self.authorize = authorize
        self.stats = stats
        self.peer_key: bytes = b""
        self.channel: Any = None
        self._rids = itertools.count(secrets.randbelow(2**61) + 1)
        self._pending: dict[int, tuple[bytes, asyncio.Future[Any]]] = {}
        self._served: OrderedDict[int, bytes | None] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ready = asyncio.Event()
        self.resent = 0

    # ---- channel lifecycle -------------------------------------------------
    def attach(self, channel: Any, peer_key: bytes) -> None:
        """Make ``channel`` current; requests still unanswered are re-sent on it."""
        self.channel, self.peer_key = channel, peer_key
        self._ready.set()
        for message, fut in list(self._pending.values()):
            if not fut.done():
                self.resent += 1
                self._spawn(self._send(message))

    def detach(self, channel: Any) -> None:
        if self.channel is channel:
            self.channel = None
            self._ready.clear()

    @property
    def connected(self) -> bool:
        return self.channel is not None

    async def wait_ready(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for _, fut in self._pending.values():
            if not fut.done():
                fut.set_exception(RpcError("link closed", "closed"))
        self._pending.clear()

    # ---- calling -----------------------------------------------------------
    async def call(self, method: str, body: Any = None, tensors: Sequence[tuple[TensorSpec, Any]] = (),
                   timeout: float = 3.0) -> tuple[Any, list[tuple[TensorSpec, memoryview]]]:
        rid = next(self._rids)
        env = Envelope(Kind.REQUEST, method, rid, self.sender, body, tuple(s for s, _ in tensors))
        message = encode_frames(encode_message(env, [b for _, b in tensors]))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (message, fut)
        try:
            if self.channel is not None:
                self._spawn(self._send(message))
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise RpcTimeout(f"{method}: no answer within {timeout:g} s") from None
        finally:
            self._pending.pop(rid, None)

    def notify(self, method: str, body: Any = None) -> bool:
        if self.channel is None:
            return False
        message = encode_frames(encode_message(Envelope(Kind.NOTIFY, method, 0, self.sender, body)))
        self._spawn(self._send(message))
        return True

    async def _send(self, message: bytes) -> None:
        channel = self.channel
        if channel is None:
            return
        try:
            await channel.send(message)
        except ConnectionError:
            pass  # the pending entry stays: re-sent when the next channel attaches

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- receiving ---------------------------------------------------------
    def on_message(self, message: bytes) -> None:
        """One message from the channel. Malformed input is counted and dropped."""
        self.stats.received += 1
        try:
            env, views = decode_message(decode_frames(message))
        except ProtocolError as exc:
            self.stats.protocol_errors += 1
            log.debug("dropped a malformed channel message: %s", exc)
            return
        if env.kind in (Kind.REPLY, Kind.ERROR):
            entry = self._pending.get(env.rid)
            if entry is None or entry[1].done():
                return  # late or duplicate reply
            fut = entry[1]
            if env.kind == Kind.REPLY:
                fut.set_result((env.body, list(zip(env.tensors, views))))
            else:
                b = env.body if isinstance(env.body, dict) else {}
                fut.set_exception(RpcError(str(b.get("message", "remote error")), str(b.get("code", "error"))))
            return
        if env.method == KEEPALIVE:
            return
        if env.kind == Kind.REQUEST:
            if env.rid in self._served:
                cached = self._served[env.rid]
                if cached is not None:  # answered already: the reply was lost with a path
                    self._spawn(self._send(cached))
                return  # still running: its reply will follow
            self._served[env.rid] = None
            while len(self._served) > SERVED_CACHE:
                self._served.popitem(last=False)
        if len(self._tasks) >= MAX_INFLIGHT:
            self._reply_error(env, "busy", "too many requests in flight")
            return
        self._spawn(self._handle(env, views))

    async def _handle(self, env: Envelope, views: list[memoryview]) -> None:
        method = env.method
        handler = self.handlers.get(method)
        if handler is None or not self.authorize(self.peer_key, method):
            self.stats.refused += 1
            self._reply_error(env, "unknown_method", f"no method '{method}' here")
            return
        self.stats.by_method[method] = self.stats.by_method.get(method, 0) + 1
        # Handlers may keep tensor views: give them their own copy of the bytes.
        call = Call(self.peer_key, method, env.body, [(s, memoryview(bytes(v))) for s, v in zip(env.tensors, views)])
        try:
            result = await handler(call)
        except ProtocolError as exc:
            self.stats.protocol_errors += 1
            self._reply_error(env, "bad_request", str(exc))
            return
        except RpcError as exc:
            self._reply_error(env, exc.code, str(exc))
            return
        except EdgemeshError as exc:
            self._reply_error(env, type(exc).__name__, str(exc))
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            self.stats.internal_errors += 1
            log.exception("handler %s failed", method)
            self._reply_error(env, "internal", "internal error")
            return
        if env.kind == Kind.NOTIFY:
            return
        reply = result if isinstance(result, Reply) else Reply(result)
        out = Envelope(Kind.REPLY, method, env.rid, self.sender, reply.body, tuple(s for s, _ in reply.tensors))
        try:
            message = encode_frames(encode_message(out, [b for _, b in reply.tensors]))
        except ProtocolError as exc:
            self._reply_error(env, "internal", f"unencodable reply: {exc}")
            return
        self._finish(env.rid, message)

    def _reply_error(self, env: Envelope, code: str, text: str) -> None:
        if env.kind != Kind.REQUEST:
            return
        out = Envelope(Kind.ERROR, env.method, env.rid, self.sender, {"code": code, "message": text[:500]})
        self._finish(env.rid, encode_frames(encode_message(out)))

    def _finish(self, rid: int, message: bytes) -> None:
        if rid in self._served:
            self._served[rid] = message
        self._spawn(self._send(message))

    def keepalive(self) -> None:
        self.notify(KEEPALIVE)
