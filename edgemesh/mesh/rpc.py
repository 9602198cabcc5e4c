"""Typed request/response and one-way messages over zmq ROUTER/DEALER sockets.

The server learns who is calling from the ZAP User-Id of the link (the CURVE key the handshake
proved), never from the envelope's claimed sender. Every malformed message is a
``ProtocolError``: counted, dropped (or answered with an error when it had a usable rid), and
the loop carries on. Handlers run as tasks so one slow call cannot stall the socket; what a
call does and how it is answered is ``edgemesh.rpc.dispatch``, shared with ICE channels.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import TYPE_CHECKING, Any, AsyncIterator, Sequence

import zmq
import zmq.asyncio

from edgemesh.errors import EdgemeshError, ProtocolError, RpcError
from edgemesh.rpc.dispatch import MAX_INFLIGHT, Authorize, Dispatcher, Handler, RpcStats, allow_all, answer, settle
from edgemesh.wire.envelope import Envelope, Kind, decode_message, encode_message
from edgemesh.wire.tensor import TensorSpec

if TYPE_CHECKING:
    from edgemesh.transport.zmq_link import ZmqTransport

log = logging.getLogger(__name__)


class RpcServer:
    def __init__(
        self,
        sock: zmq.asyncio.Socket,
        sender: bytes,
        handlers: dict[str, Handler],
        stats: RpcStats,
        authorize: Authorize = allow_all,
    ) -> None:
        self.sock = sock
        self.stats = stats
        self.dispatcher = Dispatcher(sender, handlers, stats, authorize)
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        try:
            while True:
                frames = await self.sock.recv_multipart(copy=False)
                self._dispatch(frames)
        finally:
            for t in list(self._tasks):
                t.cancel()

    def _dispatch(self, frames: list[zmq.Frame]) -> None:
        self.stats.received += 1
        if len(frames) < 2:
            self.stats.protocol_errors += 1
            return
        route, payload = frames[0], frames[1:]
        try:
            peer_key = payload[0].get("User-Id").encode()
        except (zmq.ZMQError, AttributeError):
            peer_key = b""
        try:
            source = payload[0].get("Peer-Address") or ""
        except (zmq.ZMQError, AttributeError):
            source = ""
        try:
            env, views = decode_message(payload)
        except ProtocolError as exc:
            self.stats.protocol_errors += 1
            log.debug("dropped a malformed message: %s", exc)
            return
        if env.kind not in (Kind.REQUEST, Kind.NOTIFY):
            self.stats.protocol_errors += 1
            return
        if len(self._tasks) >= MAX_INFLIGHT:
            self._send(route, self.dispatcher.error(env, "busy", "too many requests in flight", encode_message))
            return
        task = asyncio.ensure_future(self._handle(route, peer_key, source, env, views))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, route: zmq.Frame, peer_key: bytes, source: str, env: Envelope,
                      views: list[memoryview]) -> None:
        self._send(route, await self.dispatcher.serve(peer_key, env, list(zip(env.tensors, views)), encode_message,
                                                      source))

    def _send(self, route: zmq.Frame, frames: list[Any] | None) -> None:
        if frames is None:
            return
        try:
            if not _try_send(self.sock, [route, *frames]):
                log.debug("reply dropped: peer not reading")
        except zmq.ZMQError as exc:
            if exc.errno != zmq.ETERM:
                log.debug("reply dropped: %s", exc)


class RpcClient:
    """Calls over one DEALER. ``run()`` must be running (as a task) to receive replies."""

    def __init__(self, sock: zmq.asyncio.Socket, sender: bytes, stats: RpcStats | None = None) -> None:
        self.sock = sock
        self.sender = sender
        self.stats = stats or RpcStats()
        self._rids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[tuple[Any, list[tuple[TensorSpec, memoryview]]]]] = {}

    async def run(self) -> None:
        try:
            while True:
                frames = await self.sock.recv_multipart(copy=False)
                try:
                    env, views = decode_message(frames)
                except ProtocolError:
                    self.stats.protocol_errors += 1
                    continue
                fut = self._pending.pop(env.rid, None)
                if fut is None or fut.done():
                    continue  # a late reply to a call that already timed out
                if not settle(fut, env, views):
                    self.stats.protocol_errors += 1
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(RpcError("link closed", "closed"))
            self._pending.clear()

    async def call(
        self,
        method: str,
        body: Any = None,
        tensors: Sequence[tuple[TensorSpec, Any]] = (),
        timeout: float = 3.0,
    ) -> tuple[Any, list[tuple[TensorSpec, memoryview]]]:
        rid = next(self._rids)
        env = Envelope(Kind.REQUEST, method, rid, self.sender, body, tuple(s for s, _ in tensors))
        frames = encode_message(env, [b for _, b in tensors])
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            # Fast path: the socket takes it now (no timer, no extra task). zmq.asyncio reports
            # "would block" through the returned future, not by raising. Else not connected yet
            # (IMMEDIATE): wait for the link up to the deadline.
            sent = _try_send(self.sock, frames)
            return await answer(method, fut, timeout, None if sent else self.sock.send_multipart(frames, copy=False))
        except zmq.ZMQError as exc:
            # The link was closed under a caller that still held it (a member removed or left
            # while a probe or a gossip round was on its way to it): a typed error, as for a
            # reply that never comes, not a zmq error that ends the caller's loop.
            raise RpcError(f"{method}: link closed ({exc.strerror})", "closed") from None
        finally:
            self._pending.pop(rid, None)

    def notify(self, method: str, body: Any = None) -> bool:
        """Fire and forget; False when the peer is not connected or the link is closed."""
        frames = encode_message(Envelope(Kind.NOTIFY, method, 0, self.sender, body))
        try:
            return _try_send(self.sock, frames)
        except zmq.ZMQError:
            return False


def _try_send(sock: zmq.asyncio.Socket, frames: list[Any]) -> bool:
    """Send without blocking; False if the socket would block (peer not connected or full).
    A closed socket raises ``zmq.ZMQError`` (ENOTSOCK)."""
    try:
        result = sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
    except zmq.Again:
        return False
    if isinstance(result, asyncio.Future) and result.done():
        exc = result.exception()
        if isinstance(exc, zmq.Again):
            return False
        if exc is not None:
            raise exc
    return True


@contextlib.asynccontextmanager
async def rpc_session(transport: ZmqTransport, endpoint: str, server_curve_key: bytes,
                      sender: bytes) -> AsyncIterator[RpcClient]:
    """A client to one server for the duration of a ``with`` block: its reader runs meanwhile,
    and the socket is closed afterwards on every path."""
    sock = transport.client(endpoint, server_curve_key)
    client = RpcClient(sock, sender)
    reader = asyncio.ensure_future(client.run())
    try:
        yield client
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, EdgemeshError):
            await reader
        transport.forget(sock)
