"""RPC with one peer over its current ICE channel: the same envelopes and semantics as zmq.

Handlers, authorization and error replies are ``rpc.dispatch.Dispatcher``'s, as for
``mesh.rpc.RpcServer``, so the daemon serves a peer identically on any path. The peer's identity is the CURVE key of the member whose node key
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
from typing import Any, Awaitable, Sequence

from edgemesh.errors import ProtocolError, RpcError
from edgemesh.nat.framing import decode_frames, encode_frames
from edgemesh.rpc.dispatch import (MAX_INFLIGHT, Authorize, Dispatcher, Handler, RequestLog, RpcStats, answer,
                                   settle)
from edgemesh.wire.envelope import Envelope, Kind, decode_message, encode_message
from edgemesh.wire.tensor import TensorSpec

log = logging.getLogger(__name__)

KEEPALIVE = "nat.keepalive"  # a notify answered by nobody: it only proves the path is alive


def _encode(env: Envelope, buffers: Sequence[Any]) -> bytes:
    return encode_frames(encode_message(env, buffers))


class ChannelRpc:
    """Calls and serving over one peer's current channel (anything with ``async send(bytes)``)."""

    def __init__(self, sender: bytes, handlers: dict[str, Handler], authorize: Authorize, stats: RpcStats) -> None:
        self.sender = sender
        self.stats = stats
        self.dispatcher = Dispatcher(sender, handlers, stats, authorize)
        self.peer_key: bytes = b""
        self.channel: Any = None
        self._rids = itertools.count(secrets.randbelow(2**61) + 1)
        self._pending: dict[int, tuple[bytes, asyncio.Future[Any]]] = {}
        self._served: RequestLog[bytes] = RequestLog()
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
        message = _encode(env, [b for _, b in tensors])
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (message, fut)
        try:
            if self.channel is not None:
                self._spawn(self._send(message))
            return await answer(method, fut, timeout)
        finally:
            self._pending.pop(rid, None)

    def notify(self, method: str, body: Any = None) -> bool:
        if self.channel is None:
            return False
        message = _encode(Envelope(Kind.NOTIFY, method, 0, self.sender, body), ())
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
            if entry is not None and not entry[1].done():
                settle(entry[1], env, views)
            return  # else a late or duplicate reply
        if env.method == KEEPALIVE:
            return
        if env.kind == Kind.REQUEST:
            first, cached = self._served.admit(env.rid)
            if not first:
                if cached is not None:  # answered already: the reply was lost with a path
                    self._spawn(self._send(cached))
                return  # still running: its reply will follow
        if len(self._tasks) >= MAX_INFLIGHT:
            self._finish(env.rid, self.dispatcher.error(env, "busy", "too many requests in flight", _encode))
            return
        self._spawn(self._handle(env, views))

    async def _handle(self, env: Envelope, views: list[memoryview]) -> None:
        # Handlers may keep tensor views: give them their own copy of the bytes.
        tensors = [(s, memoryview(bytes(v))) for s, v in zip(env.tensors, views)]
        self._finish(env.rid, await self.dispatcher.serve(self.peer_key, env, tensors, _encode))

    def _finish(self, rid: int, message: bytes | None) -> None:
        if message is None:
            return
        self._served.answered(rid, message)
        self._spawn(self._send(message))

    def keepalive(self) -> None:
        self.notify(KEEPALIVE)
