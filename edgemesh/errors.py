"""Exceptions with messages a user can act on.

The CLI prints ``EdgemeshError`` subclasses as one line (no traceback unless ``--debug``).
Anything else escaping to the CLI is a bug and is shown with its traceback.
"""

from __future__ import annotations


class EdgemeshError(Exception):
    """Base class: the message is shown to the user as-is."""

    exit_code = 1


class ConfigError(EdgemeshError):
    """Bad configuration file, flag or state directory."""

    exit_code = 2


class StateDirError(ConfigError):
    """The state directory is missing, unreadable or not an edgemesh node."""


class ProtocolError(EdgemeshError):
    """A frame or message that does not follow the wire protocol.

    Raised by the sans-IO codecs for any malformed input; the daemon counts it, drops the
    frame, and carries on.
    """


class AuthError(EdgemeshError):
    """Authentication or authorization refused (bad token, unknown key, replay, bad signature)."""

    exit_code = 3


class TokenError(AuthError):
    """A join token that cannot be parsed or does not belong to a reachable cluster."""


class RpcError(EdgemeshError):
    """A remote procedure call failed on the remote side."""

    def __init__(self, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.code = code


class RpcTimeout(RpcError):
    """No answer within the deadline."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="timeout")


class NotRunningError(EdgemeshError):
    """No daemon answers for the given state directory."""


class PortInUseError(EdgemeshError):
    """The requested port is already taken by another process."""

    exit_code = 2


class SwarmError(EdgemeshError):
    """A swarm query that cannot produce an answer (no member answered, bad backend settings)."""


class DatasetMissingError(ConfigError):
    """An offline dataset is not installed on this machine (the message names the package)."""


class ImageError(EdgemeshError):
    """An input image that cannot be classified; ``http_status`` is the 4xx the API answers with."""

    http_status = 400


class EmptyImageError(ImageError):
    """No bytes, or an array with no elements."""


class NotAnImageError(ImageError):
    """Bytes that are not a PNG/JPEG (or other decodable image), or an array of the wrong type."""

    http_status = 415


class ImageTooLargeError(ImageError):
    """Over the byte limit or the pixel limit (protects against decompression bombs)."""

    http_status = 413


class ImageSizeError(ImageError):
    """An image or array whose shape does not match the model's input and cannot be resized."""

    http_status = 422
