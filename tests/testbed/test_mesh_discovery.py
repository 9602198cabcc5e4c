"""LAN discovery between two network namespaces joined by a veth pair (root only).

`edgemesh discover` in one namespace finds the cluster announced in the other, and a join with
a stale token (wrong join port) succeeds by falling back to the discovered member.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgemesh.identity.statedir import StateDir
from edgemesh.identity.token import JoinPoint, JoinToken
from edgemesh.runtime.processes import running_daemon

pytestmark = [pytest.mark.testbed, pytest.mark.integration]

if os.geteuid() != 0 or shutil.which("ip") is None:
    pytest.skip("needs root and iproute2 to create network namespaces", allow_module_level=True)


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture
def two_hosts():
    tag = f"emd{os.getpid() % 100000}"
    a, b = f"{tag}a", f"{tag}b"
    sh("ip", "netns", "add", a)
    try:
        sh("ip", "netns", "add", b)
        sh("ip", "link", "add", f"{tag}x", "netns", a, "type", "veth", "peer", "name", f"{tag}y", "netns", b)
        for ns, dev, ip in ((a, f"{tag}x", "10.231.7.1/24"), (b, f"{tag}y", "10.231.7.2/24")):
            sh("ip", "-n", ns, "addr", "add", ip, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def em(ns: str, *args: str, home: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGEMESH_HOME": str(home), "COLUMNS": "200"}
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "edgemesh.cli.__main__", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_discover_and_join_with_stale_token(two_hosts, tmp_path):
    a, b = two_hosts
    sa, sb = StateDir(tmp_path / "a"), StateDir(tmp_path / "b")
    try:
        res = em(a, "init", "--state-dir", str(sa.path), "--host", "10.231.7.1", "--port", "7700",
                 "--name", "alpha", "--detach", home=tmp_path)
        assert res.returncode == 0, res.stderr
        cluster = sa.require_cluster()
        found = em(b, "discover", "--seconds", "3", home=tmp_path)
        assert found.returncode == 0, found.stderr
        assert cluster.cluster_id in found.stdout, found.stdout + found.stderr
        # A token whose join endpoint is stale (nothing listens on 7999).
        key, _ = sa.load_identity()
        stale = JoinToken.issue(cluster.cluster_id, cluster.secret,
                                (JoinPoint("tcp://10.231.7.1:7999", key.sign_public),)).encode()
        res = em(b, "join", stale, "--state-dir", str(sb.path), "--host", "10.231.7.2", "--port", "7700",
                 "--name", "beta", "--detach", home=tmp_path)
        assert res.returncode == 0, res.stderr
        assert "via tcp://10.231.7.1:7701" in res.stderr
        st = em(b, "status", "--state-dir", str(sb.path), "--json", "-", home=tmp_path)
        names = {m["name"] for m in json.loads(st.stdout)["members"]}
        assert names == {"alpha", "beta"}
    finally:
        for ns, sd in ((a, sa), (b, sb)):
            if running_daemon(sd):
                em(ns, "stop", "--state-dir", str(sd.path), home=tmp_path)
            rec = running_daemon(sd)
            if rec:
                os.kill(int(rec["pid"]), 9)
