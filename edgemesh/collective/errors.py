"""Errors of the collective data plane.

They subclass ``EdgemeshError`` so the CLI and the runtime show them as one actionable line.
After any of them the group is broken (peers are at different points of the op sequence): the
caller closes it and re-plans; every further call raises ``CollectiveError`` at once.
"""

from __future__ import annotations

from edgemesh.errors import AuthError, EdgemeshError, ProtocolError


class CollectiveError(EdgemeshError):
    """A collective could not complete; the group must be closed and rebuilt."""


class CollectiveTimeout(CollectiveError):
    """A peer did not deliver its part within the deadline (hung, overloaded, or gone silently)."""

    def __init__(self, message: str, waiting_for: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.waiting_for = waiting_for


class PeerLost(CollectiveError):
    """A peer's connection dropped (process died, host vanished, link cut)."""

    def __init__(self, message: str, rank: int | None = None, aborted: bool = False,
                 lost: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.rank = rank
        self.aborted = aborted  # True: that rank is alive but gave up (it lost someone else)
        # The ranks known to be gone: ``rank`` itself, or for an abort, those the aborting rank
        # saw drop — so a re-planner drops the dead member, not the messenger.
        self.lost = lost if aborted else ((rank,) if rank is not None else ())


class LinkAuthError(CollectiveError, AuthError):
    """A data-plane frame failed authentication (tampered, replayed, reordered or forged).

    The stream from that rank can no longer be trusted, so the group is over like for a lost peer.
    """

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


class LinkProtocolError(CollectiveError, ProtocolError):
    """Bytes on a data-plane connection that do not follow the frame format (e.g. an oversized length)."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank
