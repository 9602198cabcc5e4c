"""The data plane's TLS pieces (collective.tls), in memory: pair-certificate derivation, pinning,
cipher-suite choice. Handshakes run over ssl.MemoryBIO, no sockets."""

from __future__ import annotations

import os
import ssl

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from edgemesh.collective import tls
from edgemesh.errors import AuthError, ConfigError

pytestmark = [pytest.mark.unit, pytest.mark.security]


def _pair() -> tuple[bytes, bytes]:
    sk = X25519PrivateKey.generate()
    return (sk.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
            sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def _seeds(job_a: str = "job", job_b: str = "job", world: int = 3) -> tuple[bytes, bytes]:
    (sa, pa), (sb, pb) = _pair(), _pair()
    a = tls.pair_seed(sa, pb, job=job_a, world=world, ranks=(0, 2), keys=(pa, pb))
    b = tls.pair_seed(sb, pa, job=job_b, world=world, ranks=(0, 2), keys=(pa, pb))
    return a, b


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """Run a TLS handshake between two contexts in memory; raises the first side's SSLError."""
    bios = [ssl.MemoryBIO() for _ in range(4)]
    s = server.wrap_bio(bios[0], bios[1], server_side=True)
    c = client.wrap_bio(bios[2], bios[3], server_side=False)
    done = [False, False]
    for _ in range(20):
        for i, (obj, inbio, peer_out) in enumerate(((c, bios[2], bios[1]), (s, bios[0], bios[3]))):
            if not done[i]:
                try:
                    obj.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            inbio.write(peer_out.read())
        if all(done):
            # TLS 1.3: the server checks the client's certificate on the client's last flight.
            c.write(b"x")
            bios[0].write(bios[3].read())
            assert s.read(1) == b"x"
            return s, c
    raise AssertionError("handshake did not finish")


def test_both_ends_derive_the_same_certificate_and_other_jobs_do_not() -> None:
    a, b = _seeds()
    assert a == b and len(a) == 32
    assert tls.pair_cert(a).der == tls.pair_cert(b).der  # deterministic, byte for byte
    a, b = _seeds(job_a="job-1", job_b="job-2")
    assert a != b


def test_the_pair_seed_binds_world_ranks_and_keys() -> None:
    (sa, pa), (sb, pb) = _pair(), _pair()
    base = dict(job="j", world=3, ranks=(0, 2), keys=(pa, pb))
    ref = tls.pair_seed(sa, pb, **base)
    for change in (dict(world=4), dict(ranks=(1, 2)), dict(keys=(pb, pa)), dict(job="k")):
        assert tls.pair_seed(sa, pb, **{**base, **change}) != ref, change


def test_an_invalid_peer_key_is_an_auth_error() -> None:
    secret, _ = _pair()
    with pytest.raises(AuthError):
        tls.pair_seed(secret, bytes(32), job="j", world=2, ranks=(0, 1), keys=(bytes(32), bytes(32)))


@pytest.mark.parametrize("cipher", ["aes", "chacha20"])
def test_matching_pair_certificates_connect_with_tls13_and_the_servers_suite(cipher: str) -> None:
    a, b = _seeds()
    server = tls.pair_context(tls.pair_cert(a), server=True, cipher=cipher)
    client = tls.pair_context(tls.pair_cert(b), server=False, cipher="aes")
    s, c = _handshake(server, client)
    assert c.version() == "TLSv1.3"
    assert c.getpeercert(binary_form=True) == s.getpeercert(binary_form=True) == tls.pair_cert(a).der
    if tls.set_tls13_suites(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), tls.SUITES[cipher]):
        want = "TLS_CHACHA20_POLY1305_SHA256" if cipher == "chacha20" else "TLS_AES_256_GCM_SHA384"
        assert c.cipher()[0] == want


def test_another_jobs_certificate_fails_the_handshake() -> None:
    a, b = _seeds(job_a="job-1", job_b="job-2")
    server = tls.pair_context(tls.pair_cert(a), server=True, cipher="aes")
    client = tls.pair_context(tls.pair_cert(b), server=False, cipher="aes")
    with pytest.raises(ssl.SSLError):
        _handshake(server, client)


def test_a_client_with_the_right_ca_but_its_own_key_fails() -> None:
    """Knowing the pair certificate (it is public on the wire) is not enough: the client must
    hold its key. A client presenting another key's certificate is refused by the server."""
    a, _ = _seeds()
    server = tls.pair_context(tls.pair_cert(a), server=True, cipher="aes")
    client = tls.pair_context(tls.pair_cert(os.urandom(32)), server=False, cipher="aes")
    client.load_verify_locations(cadata=tls.pair_cert(a).der)  # it accepts the server...
    with pytest.raises(ssl.SSLError):
        _handshake(server, client)  # ...but the server does not accept it


def test_cipher_choice_follows_the_cpu() -> None:
    assert tls.cpu_has_aes("processor\t: 0\nflags\t\t: fpu sse2 aes avx2\n")
    assert not tls.cpu_has_aes("processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\n")  # Pi 4 (A72)
    assert tls.cpu_has_aes("Features\t: fp asimd aes pmull sha1 sha2 crc32\n")  # A76 and later
    assert tls.resolve_cipher("chacha20") == "chacha20"
    assert tls.resolve_cipher("auto") in ("aes", "chacha20")
    with pytest.raises(ConfigError, match="chacha20"):
        tls.resolve_cipher("rc4")


def test_job_digest_is_short_and_distinct() -> None:
    assert len(tls.job_digest("a")) == 16 and tls.job_digest("a") != tls.job_digest("b")
