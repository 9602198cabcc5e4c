"""Checks for message bodies: every field read from the network is type-checked here."""

from __future__ import annotations

from typing import Any, TypeVar

from edgemesh.errors import ProtocolError

T = TypeVar("T")


def body_map(body: Any) -> dict[str, Any]:
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise ProtocolError("message body must be a map")
    return body


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
