"""Entering a named network namespace from Python (``setns``; ``os.setns`` needs Python 3.12)."""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"


def libc() -> ctypes.CDLL:
    return ctypes.CDLL("libc.so.6", use_errno=True)


def setns_fd(lib: ctypes.CDLL, fd: int) -> None:
    """Move the calling *thread* into the network namespace behind ``fd``."""
    if lib.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def enter(name: str) -> None:
    """Move this (single-threaded) process into the named namespace, keeping its mounts:
    unlike ``ip netns exec``, /sys/fs/cgroup stays visible, so a daemon can read its caps."""
    fd = os.open(f"{NETNS_DIR}/{name}", os.O_RDONLY)
    try:
        setns_fd(libc(), fd)
    finally:
        os.close(fd)
