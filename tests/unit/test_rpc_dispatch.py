"""rpc.dispatch: the one place a call is authorised, run and answered, for zmq links and ICE
channels alike; and the request log that answers a re-sent request without running it twice."""

from __future__ import annotations

import asyncio

import pytest

from edgemesh.errors import ConfigError, ProtocolError, RpcError, RpcTimeout
from edgemesh.rpc.dispatch import Dispatcher, Reply, RequestLog, RpcStats, answer, settle
from edgemesh.wire.envelope import Envelope, Kind, encode_message

pytestmark = pytest.mark.unit


def _serve(dispatcher: Dispatcher, method: str, kind: Kind = Kind.REQUEST, key: bytes = b"K") -> Envelope | None:
    """Serve one call; the reply as the caller would decode it (None when nothing is sent)."""
    def encode(env: Envelope, buffers):  # type: ignore[no-untyped-def]
        encode_message(env, buffers)  # what a transport does: raises ProtocolError when unencodable
        return env

    return asyncio.run(dispatcher.serve(key, Envelope(kind, method, 7 if kind == Kind.REQUEST else 0, b"c", {"x": 1}), [], encode))


async def _raise(exc: Exception):  # type: ignore[no-untyped-def]
    raise exc


def test_results_and_errors_become_typed_replies() -> None:
    async def ok(call):  # type: ignore[no-untyped-def]
        return {"got": call.body["x"], "from": call.peer_key}

    handlers = {
        "ok": ok,
        "proto": lambda call: _raise(ProtocolError("no field y")),
        "rpc": lambda call: _raise(RpcError("not here", "unknown_peer")),
        "config": lambda call: _raise(ConfigError("model missing")),
        "crash": lambda call: _raise(ValueError("bug")),
    }
    stats = RpcStats()
    d = Dispatcher(b"s", handlers, stats, authorize=lambda key, method: key == b"K")
    reply = _serve(d, "ok")
    assert reply is not None and reply.kind == Kind.REPLY and reply.rid == 7 and reply.body == {"got": 1, "from": b"K"}
    codes = {m: _serve(d, m).body["code"] for m in ("proto", "rpc", "config", "crash")}  # type: ignore[union-attr]
    assert codes == {"proto": "bad_request", "rpc": "unknown_peer", "config": "ConfigError", "crash": "internal"}
    assert _serve(d, "crash").body["message"] == "internal error"  # type: ignore[union-attr]  # no details leak
    assert _serve(d, "missing").body["code"] == "unknown_method"  # type: ignore[union-attr]
    assert _serve(d, "ok", key=b"stranger").body["code"] == "unknown_method"  # type: ignore[union-attr]
    assert _serve(d, "ok", Kind.NOTIFY) is None and _serve(d, "crash", Kind.NOTIFY) is None  # notifies get nothing
    assert stats.refused == 2 and stats.protocol_errors == 1 and stats.internal_errors == 3
    assert stats.by_method["ok"] == 2


def test_an_unencodable_reply_is_answered_with_an_internal_error() -> None:
    from edgemesh.wire.tensor import TensorSpec

    async def lying(call):  # type: ignore[no-untyped-def]
        return Reply({}, tensors=[(TensorSpec("uint8", (4,)), b"12")])  # 2 bytes for a 4-byte spec

    d = Dispatcher(b"s", {"lying": lying}, RpcStats())

    def encode(env: Envelope, buffers):  # type: ignore[no-untyped-def]
        if env.kind == Kind.REPLY:
            raise ProtocolError("tensor frame of the wrong size")
        return env

    out = asyncio.run(d.serve(b"K", Envelope(Kind.REQUEST, "lying", 3, b"c", None), [], encode))
    assert out.kind == Kind.ERROR and out.body["code"] == "internal" and "unencodable" in out.body["message"]


def test_the_request_log_runs_a_request_once_and_replays_its_reply() -> None:
    log: RequestLog[bytes] = RequestLog(size=2)
    assert log.admit(1) == (True, None)
    assert log.admit(1) == (False, None)  # still running
    log.answered(1, b"reply")
    assert log.admit(1) == (False, b"reply")
    log.admit(2), log.admit(3)  # the oldest falls out
    assert log.admit(1) == (True, None)


def test_settle_and_answer_resolve_a_callers_wait() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        assert settle(fut, Envelope(Kind.REPLY, "m", 1, b"s", {"ok": True}), [])
        assert await answer("m", fut, 1.0) == ({"ok": True}, [])
        fut = loop.create_future()
        settle(fut, Envelope(Kind.ERROR, "m", 1, b"s", {"code": "busy", "message": "too many"}), [])
        with pytest.raises(RpcError) as err:
            await answer("m", fut, 1.0)
        assert err.value.code == "busy"
        assert not settle(loop.create_future(), Envelope(Kind.NOTIFY, "m", 0, b"s"), [])
        with pytest.raises(RpcTimeout, match="m: no answer within 0.01 s"):
            await answer("m", loop.create_future(), 0.01)

    asyncio.run(main())
