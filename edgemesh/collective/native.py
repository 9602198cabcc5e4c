"""Binding of ``native_links.c``: the decode-size messages of ``SecureLinks`` moved by C.

A star allreduce of one decode step costs the hub two reads, two writes and an add: a few
microseconds of work, but ~150 µs of CPU per operation in the Python path, and a 3-member
decode step runs ~60 of them on every rank. The C functions do the same reads and writes over
the same sockets and TLS sessions; ``tcp_links`` decides when they may (see ``SecureLinks.
recv_pairs``) and decodes anything unexpected itself.

The TLS session: Python's ``ssl`` module does not expose its OpenSSL ``SSL*``. It is read from
the ``_ssl._SSLSocket`` object, whose C layout starts with the object header, a weak reference
and the ``SSL*`` in every CPython from 3.7 to 3.13, and accepted only when two independent
checks agree: OpenSSL says the session's descriptor is the socket's, and its ``SSL_CTX`` is the
one of the socket's context (read from the ``_ssl._SSLContext`` object, whose header is followed
by that pointer). Another interpreter, another version or any mismatch: the Python path, always
correct, just slower. ``EDGEMESH_NATIVE_LINKS=0`` (or ``EDGEMESH_NATIVE=0``) turns it off.
"""

from __future__ import annotations

import ctypes
import logging
import os
import ssl
import sys
import threading
from pathlib import Path

from edgemesh.cbuild import compile_library

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("native_links.c")
OK, OTHER, TIMEOUT, IO, BLOCKED, EOF, ELSEWHERE = range(7)
SSL_ERROR_SSL, SSL_ERROR_SYSCALL, SSL_ERROR_ZERO_RETURN = 1, 5, 6
SSL_R_UNEXPECTED_EOF_WHILE_READING = 294
MAX_LINKS = 64  # EM_MAX_LINKS in the C source


class Link(ctypes.Structure):
    """``em_link``: one connection as the C side sees it."""

    _fields_ = [("ssl", ctypes.c_void_p), ("fd", ctypes.c_int), ("got", ctypes.c_int),
                ("rbuf", ctypes.c_void_p), ("err", ctypes.c_int), ("sent", ctypes.c_int),
                ("wbuf", ctypes.c_void_p), ("detail", ctypes.c_ulong)]


PRE_MAX, TAIL_MAX = 32, 64  # EM_PRE_MAX, EM_TAIL_MAX


class DirectCtx(ctypes.Structure):
    """``em_direct_ctx``: the direct allreduce as a callback of the native decode loop."""

    _fields_ = [("links", ctypes.c_void_p), ("k", ctypes.c_int), ("me", ctypes.c_int), ("n", ctypes.c_int),
                ("timeout_ms", ctypes.c_int), ("spin_us", ctypes.c_int), ("seq", ctypes.c_uint64),
                ("ops", ctypes.c_uint64), ("bytes", ctypes.c_uint64), ("ns", ctypes.c_uint64), ("status", ctypes.c_int),
                ("phase", ctypes.c_int), ("which", ctypes.c_int), ("pre_len", ctypes.c_int),
                ("tail_len", ctypes.c_int), ("pre", ctypes.c_uint8 * PRE_MAX),
                ("tails", ctypes.c_uint8 * ((MAX_LINKS + 1) * TAIL_MAX)),
                ("head", ctypes.c_uint8 * (16 + PRE_MAX + 9 + TAIL_MAX)),
                ("expect", ctypes.c_uint8 * (MAX_LINKS * (16 + PRE_MAX + 9 + TAIL_MAX)))]


class RingStep(ctypes.Structure):
    """``em_ring_step``: one step of a native ring allreduce (offsets and counts in floats;
    record heads as offsets into one bytes blob, [0] for an fp32 part, [1] for a q8_0 one)."""

    _fields_ = [("send_off", ctypes.c_int), ("send_cnt", ctypes.c_int), ("send_mode", ctypes.c_int),
                ("send_hoff", ctypes.c_int * 2), ("send_hlen", ctypes.c_int * 2),
                ("recv_off", ctypes.c_int), ("recv_cnt", ctypes.c_int),
                ("recv_hoff", ctypes.c_int * 2), ("recv_hlen", ctypes.c_int * 2), ("add", ctypes.c_int)]


RING_ENCODE, RING_OWN_RESULT, RING_FORWARD = 0, 1, 2  # em_ring_step.send_mode


class RingState(ctypes.Structure):
    """``em_ring_state``: where a native ring op stands between calls."""

    _fields_ = [(name, ctypes.c_int) for name in ("step", "started", "part", "off", "sdone", "rdone", "dgot", "svar",
                                                  "rvar", "slen", "prev_rvar", "prev_rlen", "rwant")] + [
        ("sent_payload", ctypes.c_longlong), ("recv_payload", ctypes.c_longlong)]


class _Native:
    def __init__(self, lib: ctypes.CDLL, libssl: ctypes.CDLL | None, libcrypto: ctypes.CDLL | None) -> None:
        self.lib = lib
        self.libssl = libssl
        self.libcrypto = libcrypto


_lock = threading.Lock()
_state: _Native | None = None
_tried = False


def _disabled() -> bool:
    off = ("0", "false", "no")
    return (os.environ.get("EDGEMESH_NATIVE_LINKS", "1").lower() in off
            or os.environ.get("EDGEMESH_NATIVE", "1").lower() in off)


def _loaded(name: str) -> str | None:
    """Path of the shared library ``name`` (e.g. ``libssl.so``) this process has loaded."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1] if line.count(" ") >= 5 else ""
                if os.path.basename(path).startswith(name):
                    return path
    except OSError:
        return None
    return None


def _open_tls() -> tuple[ctypes.CDLL, ctypes.CDLL] | None:
    import _ssl  # noqa: F401 - loads the libssl and libcrypto that the ssl module runs on

    del _ssl

    ssl_path, crypto_path = _loaded("libssl.so"), _loaded("libcrypto.so")
    if sys.implementation.name != "cpython" or not (3, 7) <= sys.version_info[:2] <= (3, 13):
        return None
    if ssl_path is None or crypto_path is None:
        return None  # statically linked into _ssl: its functions are not reachable from here
    libssl, libcrypto = ctypes.CDLL(ssl_path), ctypes.CDLL(crypto_path)
    libssl.SSL_get_fd.argtypes = [ctypes.c_void_p]
    libssl.SSL_get_fd.restype = ctypes.c_int
    libssl.SSL_get_SSL_CTX.argtypes = [ctypes.c_void_p]
    libssl.SSL_get_SSL_CTX.restype = ctypes.c_void_p
    libcrypto.ERR_reason_error_string.argtypes = [ctypes.c_ulong]
    libcrypto.ERR_reason_error_string.restype = ctypes.c_char_p
    return libssl, libcrypto


def native() -> _Native | None:
    """The C side, built and loaded once; None when disabled or unavailable."""
    global _state, _tried
    if _tried:
        return _state
    with _lock:
        if not _tried:
            _state = None if _disabled() else _load()
            _tried = True
    return _state


def _load() -> _Native | None:
    # No fused multiply-add: the q8_0 codec must give numpy's bits (no libm import either: nm).
    lib = compile_library(_SOURCE, "native_links", ["-O2", "-ffp-contract=off"])
    if lib is None:
        return None
    vp, ci = ctypes.c_void_p, ctypes.c_int
    cp, pi = ctypes.c_char_p, ctypes.POINTER(ci)
    lib.edgemesh_star_hub.argtypes = [vp, ci, cp, ci, ci, vp, ci, cp, ci, ci, ci, pi, pi]
    lib.edgemesh_star_hub.restype = ci
    lib.edgemesh_star_worker.argtypes = [vp, cp, ci, vp, ci, cp, ci, vp, ci, ci, pi]
    lib.edgemesh_star_worker.restype = ci
    lib.edgemesh_direct.argtypes = [vp, ci, ci, cp, ci, vp, ci, cp, ci, vp, ci, ci, pi, pi]
    lib.edgemesh_direct.restype = ci
    lib.edgemesh_direct_step_fn.restype = vp
    lib.edgemesh_direct_step_fn.argtypes = []
    lib.edgemesh_ring.argtypes = [vp, vp, vp, vp, vp, vp, vp, ci, cp, vp, ci, ci, vp, pi]
    lib.edgemesh_q8_encode.argtypes = [vp, ci, vp]
    lib.edgemesh_q8_encode.restype = ci
    lib.edgemesh_q8_decode.argtypes = [vp, ci, vp, ci]
    lib.edgemesh_q8_decode.restype = None
    lib.edgemesh_ring.restype = ci
    if (lib.edgemesh_direct_ctx_size() != ctypes.sizeof(DirectCtx)
            or lib.edgemesh_ring_step_size() != ctypes.sizeof(RingStep)
            or lib.edgemesh_ring_state_size() != ctypes.sizeof(RingState)):
        log.warning("native links: unexpected build (%s); using the Python path", lib._name)
        return None
    try:
        tls = _open_tls()
    except OSError as exc:
        log.info("native links: OpenSSL not reachable (%s); TLS links use the Python path", exc)
        tls = None
    if tls is not None:
        libssl, libcrypto = tls
        fns = [libssl.SSL_read, libssl.SSL_write, libssl.SSL_get_error, libcrypto.ERR_clear_error,
               libcrypto.ERR_peek_last_error]
        lib.edgemesh_links_tls.argtypes = [vp] * 5
        lib.edgemesh_links_tls(*[ctypes.cast(f, vp) for f in fns])
        return _Native(lib, libssl, libcrypto)
    return _Native(lib, None, None)


_HEAD = ctypes.sizeof(ctypes.c_ssize_t) + ctypes.sizeof(ctypes.c_void_p)  # PyObject_HEAD


def session_of(sock: ssl.SSLSocket, state: _Native) -> int | None:
    """The OpenSSL ``SSL*`` of ``sock``, checked twice (see the module docstring), or None."""
    if state.libssl is None:
        return None
    obj, ctx = getattr(sock, "_sslobj", None), getattr(sock, "context", None)
    if obj is None or ctx is None or type(obj).__name__ != "_SSLSocket" or type(obj).__basicsize__ < _HEAD + 16:
        return None
    ptr = ctypes.c_void_p.from_address(id(obj) + _HEAD + ctypes.sizeof(ctypes.c_void_p)).value
    ctx_ptr = ctypes.c_void_p.from_address(id(ctx) + _HEAD).value
    if not ptr or not ctx_ptr:
        return None
    if state.libssl.SSL_get_SSL_CTX(ptr) != ctx_ptr or state.libssl.SSL_get_fd(ptr) != sock.fileno():
        return None
    return ptr


def ssl_error(state: _Native, detail: int) -> ssl.SSLError:
    """The ``ssl.SSLError`` Python's own read would have raised for OpenSSL error ``detail``."""
    text = b""
    if state.libcrypto is not None and detail:
        text = state.libcrypto.ERR_reason_error_string(detail) or b""
    words = text.decode("ascii", "replace") or "unknown error"
    reason = words.upper().replace(" ", "_")
    exc = ssl.SSLError(SSL_ERROR_SSL, f"[SSL: {reason}] {words}")
    exc.reason = reason
    exc.library = "SSL"
    return exc


def is_eof(err: int, detail: int) -> bool:
    """An ``em_link`` failure that means the peer closed (not a TLS authentication failure)."""
    if err in (0, SSL_ERROR_SYSCALL, SSL_ERROR_ZERO_RETURN):
        return True
    return err == SSL_ERROR_SSL and (detail & 0x7FFFFF) == SSL_R_UNEXPECTED_EOF_WHILE_READING
