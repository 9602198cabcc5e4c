"""TLS 1.3 for the collective data plane: one certificate per pair of ranks, derived from the
two members' node keys and the job id, pinned exactly (no CA, no hostname).

Why a *pair* certificate: the member list carries X25519 node keys, which cannot sign. Both
ends of a link compute the same static-static X25519 secret, so both can derive the same
Ed25519 key (HKDF-SHA256, domain-separated, bound to the job id, the world size, both ranks
and both node keys) and the same self-signed certificate. Each end presents it and trusts
only it: the TLS handshake (CertificateVerify, mutual) then proves that the peer holds one of
the two node secrets *for this job and this pair of ranks*. A key outside the member list, a
rank of another job, or a man in the middle cannot make that certificate; the node key itself
never signs or encrypts anything on this plane (separate derived key).

Cipher suite: TLS 1.3's AES-GCM where the CPU has AES instructions, ChaCha20-Poly1305 where it
does not (the Pi 4's Cortex-A72). Python < 3.15 has no ``SSLContext.set_ciphersuites``, so the
TLS 1.3 list is set with OpenSSL's ``SSL_CTX_set_ciphersuites`` through ctypes, after checking
that the pointer found is this context's (its options must read back equal); if that check
fails, OpenSSL's default order is kept and a warning says so. Both ends offer all three
TLS 1.3 suites, so any two settings interoperate; the listener picks by its own order.
"""

from __future__ import annotations

import ctypes
import datetime
import functools
import hashlib
import logging
import os
import ssl
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import NameOID

from edgemesh.errors import AuthError, ConfigError

log = logging.getLogger(__name__)

LABEL = b"edgemesh collective v2 tls pair certificate"
SUITES = {
    "aes": "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256",
    "chacha20": "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256",
}
CIPHERS = ("auto", "aes", "chacha20")  # what SecureLinks.bind(cipher=...) accepts
_NOT_BEFORE = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
_NOT_AFTER = datetime.datetime(9999, 12, 31, tzinfo=datetime.timezone.utc)


def job_digest(job: str) -> bytes:
    """16 bytes naming the job in the clear hello (a diagnostic; the certificate binds it)."""
    return hashlib.sha256(b"edgemesh job " + job.encode()).digest()[:16]


def cpu_has_aes(cpuinfo: str | None = None) -> bool:
    """True when /proc/cpuinfo lists AES instructions (x86 ``flags``, ARM ``Features``)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return True  # cannot tell: keep OpenSSL's default (AES first)
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features") and "aes" in value.split():
            return True
    return False


def resolve_cipher(cipher: str) -> str:
    """``auto`` → ``aes`` or ``chacha20`` for this CPU; other names are checked and kept."""
    if cipher not in CIPHERS:
        raise ConfigError(f"unknown data-plane cipher {cipher!r}; use one of {', '.join(CIPHERS)}")
    if cipher == "auto":
        return "aes" if cpu_has_aes() else "chacha20"
    return cipher


def pair_seed(own_secret: bytes, peer_public: bytes, *, job: str, world: int, ranks: tuple[int, int],
              keys: tuple[bytes, bytes]) -> bytes:
    """The 32-byte Ed25519 seed both ends of the link between ``ranks`` derive.

    ``ranks`` and ``keys`` are (lower rank, higher rank) and their raw X25519 public keys.
    """
    try:
        shared = X25519PrivateKey.from_private_bytes(own_secret).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:  # a low-order point gives an all-zero secret: never use it
        raise AuthError("a member's X25519 public key is invalid") from None
    jb = job.encode()
    info = (LABEL + struct.pack("<HHHH", world, ranks[0], ranks[1], len(jb)) + jb + keys[0] + keys[1])
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=hashlib.sha256(LABEL).digest(), info=info).derive(shared)


@dataclass(frozen=True)
class PairCert:
    der: bytes  # what the peer must present, byte for byte
    pem: bytes  # certificate then PKCS#8 key, for SSLContext.load_cert_chain


def pair_cert(seed: bytes) -> PairCert:
    """A deterministic self-signed certificate over the Ed25519 key ``seed`` (Ed25519 signatures
    are deterministic, so both ends build the same bytes)."""
    key = Ed25519PrivateKey.from_private_bytes(seed)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgemesh collective link")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(_NOT_BEFORE).not_valid_after(_NOT_AFTER).sign(key, None))
    pem = cert.public_bytes(Encoding.PEM) + key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    return PairCert(cert.public_bytes(Encoding.DER), pem)


def pair_context(cert: PairCert, *, server: bool, cipher: str) -> ssl.SSLContext:
    """TLS 1.3 only, mutual, trusting exactly ``cert``; no tickets, no hostname."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_TICKET
    if server:
        ctx.num_tickets = 0
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_chain(ctx, cert.pem)
    ctx.load_verify_locations(cadata=cert.der)
    set_tls13_suites(ctx, SUITES[cipher])
    return ctx


def _load_chain(ctx: ssl.SSLContext, pem: bytes) -> None:
    """``load_cert_chain`` reads only files: hand it an anonymous in-memory file (memfd), else a
    0600 file in a private temporary directory that is removed at once."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("edgemesh-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            return
        except OSError:
            pass  # no /proc: fall through to a file
        finally:
            os.close(fd)
    with tempfile.TemporaryDirectory(prefix="edgemesh-tls-") as d:
        path = Path(d) / "pair.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        ctx.load_cert_chain(str(path))


# ------------------------------------------------------------------ TLS 1.3 suite order


def set_tls13_suites(ctx: ssl.SSLContext, suites: str) -> bool:
    """Set the TLS 1.3 cipher suites of ``ctx``; False (and OpenSSL's default order) if this
    Python offers no way to."""
    setter = getattr(ctx, "set_ciphersuites", None)  # a future Python's own method
    if setter is not None:
        setter(suites)
        return True
    if _ctypes_set_suites(ctx, suites):
        return True
    _warn_default_order()
    return False


@functools.lru_cache(maxsize=1)
def _warn_default_order() -> None:  # once per process
    log.warning("cannot set TLS 1.3 cipher suites with this Python/OpenSSL; OpenSSL's default "
                "order (AES-256-GCM first) is used on the collective data plane")


@functools.lru_cache(maxsize=1)
def _libssl() -> ctypes.CDLL | None:
    """The libssl that Python's ``_ssl`` module is linked with (found in this process's maps)."""
    try:
        maps = Path("/proc/self/maps").read_text()
        paths = {line.split()[-1] for line in maps.splitlines() if "/libssl.so" in line}
        if len(paths) != 1:
            return None  # none (static build) or several: do not guess
        lib = ctypes.CDLL(paths.pop())
        lib.SSL_CTX_set_ciphersuites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.SSL_CTX_set_ciphersuites.restype = ctypes.c_int
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        return lib
    except (OSError, AttributeError):
        return None


def _ctypes_set_suites(ctx: ssl.SSLContext, suites: str) -> bool:
    lib = _libssl()
    if lib is None:
        return False
    # CPython's context object is PyObject_HEAD followed by the SSL_CTX pointer; the pointer is
    # used only if OpenSSL reads back this context's options through it.
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr or lib.SSL_CTX_get_options(ptr) != ctx.options:
        return False
    return bool(lib.SSL_CTX_set_ciphersuites(ptr, suites.encode()))


__all__ = ["CIPHERS", "PairCert", "cpu_has_aes", "job_digest", "pair_cert", "pair_context", "pair_seed",
           "resolve_cipher", "set_tls13_suites"]
