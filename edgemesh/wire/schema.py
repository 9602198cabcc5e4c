"""Checks for message bodies: every field read from the network is type-checked here."""

from __future__ import annotations

from typing import Any, TypeVar

import msgpack

from edgemesh.errors import ProtocolError

T = TypeVar("T")


def body_map(body: Any) -> dict[str, Any]:
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise ProtocolError("message body must be a map")
    return body


def unpack_map(data: Any, max_bytes: int, what: str) -> dict[str, Any]:
    """An untrusted msgpack map of at most ``max_bytes`` bytes, or ``ProtocolError``."""
    if not isinstance(data, bytes) or len(data) > max_bytes:
        raise ProtocolError(f"{what} must be at most {max_bytes} bytes")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(f"malformed {what}: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} must be a map")
    return obj


def need(body: dict[str, Any], key: str, kind: type[T], *, max_len: int | None = None) -> T:
    """``body[key]`` if it is a ``kind`` (bool is not an int), else ``ProtocolError``."""
    if key not in body:
        raise ProtocolError(f"missing field '{key}'")
    value = body[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"field '{key}' must be {kind.__name__}")
    if max_len is not None and hasattr(value, "__len__") and len(value) > max_len:  # type: ignore[arg-type]
        raise ProtocolError(f"field '{key}' is too long")
    return value


def maybe(body: dict[str, Any], key: str, kind: type[T], default: T) -> T:
    return need(body, key, kind) if key in body else default
