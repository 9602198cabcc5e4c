from __future__ import annotations

import stat

import pytest

from edgemesh.errors import AuthError, StateDirError, TokenError
from edgemesh.identity.keys import NodeKey, curve_public_for, verify
from edgemesh.identity.statedir import StateDir
from edgemesh.identity.token import JoinPoint, JoinToken

pytestmark = pytest.mark.unit


def test_curve_key_is_derived_from_the_signing_key_and_matches_its_secret():
    import zmq

    key = NodeKey.generate()
    assert curve_public_for(key.sign_public) == key.curve_public
    # The derived secret really belongs to the derived public key.
    assert zmq.curve_public(key.curve_secret) == key.curve_public
    assert len(key.node_id) == 20
    assert key.node_id not in repr(key.seed.hex())
    assert key.seed.hex() not in repr(key)


def test_signatures_verify_and_forgeries_fail():
    a, b = NodeKey.generate(), NodeKey.generate()
    sig = a.sign(b"hello")
    verify(a.sign_public, b"hello", sig)
    with pytest.raises(AuthError):
        verify(a.sign_public, b"hellO", sig)
    with pytest.raises(AuthError):
        verify(b.sign_public, b"hello", sig)


def test_token_roundtrip_and_damage_is_reported_clearly():
    tok = JoinToken("c0ffee", b"s" * 32, (JoinPoint("tcp://10.0.0.1:7701", b"k" * 32),), 1_900_000_000)
    text = tok.encode()
    assert text.startswith("emt2.")
    assert JoinToken.decode(text) == tok
    with pytest.raises(TokenError, match="empty"):
        JoinToken.decode("  ")
    with pytest.raises(TokenError, match="not an edgemesh join token"):
        JoinToken.decode("hello")
    with pytest.raises(TokenError, match="damaged"):
        JoinToken.decode(text[: len(text) // 2])
    with pytest.raises(TokenError, match="damaged"):
        JoinToken.decode("emt2.!!!!")
    with pytest.raises(TokenError, match="old kind that never expires"):
        JoinToken.decode("emt1.gqFjpmMwZmZlZQ")


def test_state_dir_keeps_identity_and_writes_secrets_0600(tmp_path):
    sd = StateDir(tmp_path / "n")
    key, name = sd.load_or_create_identity("alpha")
    again, name2 = StateDir(tmp_path / "n").load_or_create_identity()
    assert again.seed == key.seed and name2 == "alpha"
    info = sd.new_cluster(key.node_id)
    assert sd.load_cluster() == info
    for f in (StateDir.IDENTITY, StateDir.CLUSTER):
        assert stat.S_IMODE(sd.file(f).stat().st_mode) == 0o600
    assert stat.S_IMODE(sd.path.stat().st_mode) == 0o700


def test_state_dir_errors_are_actionable(tmp_path):
    with pytest.raises(StateDirError, match="no edgemesh node"):
        StateDir(tmp_path / "empty").load_identity()
    bad = StateDir(tmp_path / "bad")
    bad.ensure()
    bad.file(StateDir.IDENTITY).write_text("{not json")
    with pytest.raises(StateDirError, match="corrupt"):
        bad.load_identity()
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(StateDirError, match="not a directory|cannot create"):
        StateDir(afile).ensure()
