"""Typed request/response and one-way messages over zmq ROUTER/DEALER sockets.

The server learns who is calling from the ZAP User-Id of the link (the CURVE key the handshake
proved), never from the envelope's claimed sender. Every malformed message is a
``ProtocolError``: counted, dropped (or answered with an error when it had a usable rid), and
the loop carries on. Handlers run as tasks so one slow call cannot stall the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Sequence

import zmq
import zmq.asyncio

from edgemesh.errors import EdgemeshError, ProtocolError, RpcError, RpcTimeout
from edgemesh.wire.envelope import Envelope, Kind, decode_message, encode_message
from edgemesh.wire.tensor import TensorSpec

if TYPE_CHECKING:
    from edgemesh.transport.zmq_link import ZmqTransport

log = logging.getLogger(__name__)

MAX_INFLIGHT = 256  # handler tasks per server; more are refused with "busy"


@dataclass
class Call:
    """One incoming request or notify, as a handler sees it."""

    peer_key: bytes  # z85 CURVE key proven by the link
    method: str
    body: Any
    tensors: list[tuple[TensorSpec, memoryview]]


@dataclass
class Reply:
    body: Any = None
    tensors: Sequence[tuple[TensorSpec, Any]] = ()


Handler = Callable[[Call], Awaitable[Any]]  # returns a body, a Reply, or None


@dataclass
class RpcStats:
    received: int = 0
    protocol_errors: int = 0
    internal_errors: int = 0
    refused: int = 0
    by_method: dict[str, int] = field(default_factory=dict)


class RpcServer:
    def __init__(
        self,
        sock: zmq.asyncio.Socket,
        sender: bytes,
        handlers: dict[str, Handler],
        stats: RpcStats,
        authorize: Callable[[bytes, str], bool] = lambda key, method: True,
    ) -> None:
        self.sock = sock
        self.sender = sender
        self.handlers = handlers
        self.stats = stats
        self.authorize = authorize
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
            env, views = decode_message(payload)
        except ProtocolError as exc:
            self.stats.protocol_errors += 1
            log.debug("dropped a malformed message: %s", exc)
            return
        if env.kind not in (Kind.REQUEST, Kind.NOTIFY):
            self.stats.protocol_errors += 1
            return
        if len(self._tasks) >= MAX_INFLIGHT:
            self._send_error(route, env, "busy", "too many requests in flight")
            return
        task = asyncio.ensure_future(self._handle(route, peer_key, env, views))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, route: zmq.Frame, peer_key: bytes, env: Envelope, views: list[memoryview]) -> None:
        method = env.method
        handler = self.handlers.get(method)
        if handler is None or not self.authorize(peer_key, method):
            self.stats.refused += 1
            self._send_error(route, env, "unknown_method", f"no method '{method}' here")
            return
        self.stats.by_method[method] = self.stats.by_method.get(method, 0) + 1
        call = Call(peer_key, method, env.body, list(zip(env.tensors, views)))
        try:
            result = await handler(call)
        except ProtocolError as exc:
            self.stats.protocol_errors += 1
            self._send_error(route, env, "bad_request", str(exc))
            return
        except RpcError as exc:
            self._send_error(route, env, exc.code, str(exc))
            return
        except EdgemeshError as exc:
            self._send_error(route, env, type(exc).__name__, str(exc))
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            self.stats.internal_errors += 1
            log.exception("handler %s failed", method)
            self._send_error(route, env, "internal", "internal error")
            return
        if env.kind == Kind.NOTIFY:
            return
        reply = result if isinstance(result, Reply) else Reply(result)
        specs = tuple(s for s, _ in reply.tensors)
        out = Envelope(Kind.REPLY, method, env.rid, self.sender, reply.body, specs)
        self._send(route, encode_message(out, [b for _, b in reply.tensors]))

    def _send_error(self, route: zmq.Frame, env: Envelope, code: str, message: str) -> None:
        if env.kind != Kind.REQUEST:
            return
        out = Envelope(Kind.ERROR, env.method, env.rid, self.sender, {"code": code, "message": message[:500]})
        self._send(route, encode_message(out))

    def _send(self, route: zmq.Frame, frames: list[Any]) -> None:
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
                if env.kind == Kind.REPLY:
                    fut.set_result((env.body, list(zip(env.tensors, views))))
                elif env.kind == Kind.ERROR:
                    body = env.body if isinstance(env.body, dict) else {}
                    fut.set_exception(RpcError(str(body.get("message", "remote error")), str(body.get("code", "error"))))
                else:
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
            # "would block" through the returned future, not by raising.
            sent = _try_send(self.sock, frames)
            if not sent:
                # Not connected yet (IMMEDIATE): wait for the link up to the deadline.
                await asyncio.wait_for(self.sock.send_multipart(frames, copy=False), timeout)
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise RpcTimeout(f"{method}: no answer within {timeout:g} s") from None
        finally:
            self._pending.pop(rid, None)

    def notify(self, method: str, body: Any = None) -> bool:
        """Fire and forget; False when the peer is not connected."""
        frames = encode_message(Envelope(Kind.NOTIFY, method, 0, self.sender, body))
        return _try_send(self.sock, frames)


def _try_send(sock: zmq.asyncio.Socket, frames: list[Any]) -> bool:
    """Send without blocking; False if the socket would block (peer not connected or full)."""
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
