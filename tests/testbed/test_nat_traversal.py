"""Reachability across NATs on emulation/nat-mix.toml (root; one bed for the whole module).

Bootstrap on the public site with `init --turn` (coturn beside it), then full-cone, restricted,
port-restricted and symmetric sites join. Checks: every pair connected with the path types the
NATs allow, an RPC and a 10 MiB checked transfer per path type, a forged channel refused,
killing coturn leaves punched pairs alone, a NATed node restarts and rejoins. Timing targets
(join and restart seconds) are benchmark figures: `edgemesh bench join`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from edgemesh.cli.bench_join import NatBed, pair_rows

pytestmark = pytest.mark.testbed

REPO = Path(__file__).resolve().parents[2]
DEVICES = ["pub1", "c1", "r1", "p1", "s1"]


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    nb = NatBed(REPO / "emulation" / "nat-mix.toml", nodes_dir=REPO / "nodes",
                run_root=tmp_path_factory.mktemp("natbed"))
    try:
        nb.bootstrap()
        nb.rows = []
        for dev in DEVICES[1:]:
            nb.wait_quiet()  # as `bench join`: one join at a time, on a settled cluster
            t0 = nb.join(dev)
            # an event wait: generous, since hole punching on a host busy with other work took
            # more than the 20 s default for one pair (CI at load 12)
            nb.rows += pair_rows(nb.wait_connected(list(nb.started), timeout=120), dev, t0)
        yield nb
    finally:
        nb.close()


def _paths(bed):
    """Path per pair, once every pair has one (a path being replaced, relay -> punch, is briefly absent)."""
    st = bed.wait_connected(DEVICES, timeout=120, settle=0.0)
    return {a: {b: link.get("path") for b, link in NatBed.links_by_name(s).items()} for a, s in st.items()}


def test_every_pair_connected_with_the_paths_the_nats_allow(bed):
    paths = _paths(bed)
    for a in DEVICES:
        assert set(paths[a]) == set(DEVICES) - {a}
        assert all(paths[a].values()), paths
    # NATed -> public bootstrap: zmq straight to its address
    assert all(paths[d]["pub1"] == "direct" for d in DEVICES[1:])
    # cone <-> cone/restricted punched, never relayed
    for a, b in (("c1", "r1"), ("c1", "p1"), ("r1", "p1")):
        assert paths[a][b] == "punched" and paths[b][a] == "punched"
    # symmetric <-> port-restricted can only be relayed
    assert paths["s1"]["p1"] == "relayed" and paths["p1"]["s1"] == "relayed"


def test_tensor_parallel_plans_stay_off_natted_pairs(bed, tmp_path):
    """No pair here has a direct path both ways (every pair has a NAT in it), so a plan from c1
    keeps the model on c1 and says why each member was left out; asking for two devices is a
    clean error with the same reasons, not a group that could never form."""
    import subprocess
    import sys

    store = str(tmp_path / "models")
    subprocess.run([sys.executable, "-m", "edgemesh.cli", "model", "synth", "--layers", "2", "--hidden", "64",
                    "--heads", "4", "--vocab", "256", "--name", "tiny", "--store", store],
                   check=True, capture_output=True, timeout=120)
    _paths(bed)  # every pair connected
    out = json.loads(bed.em("c1", "plan", "tiny", "--store", store, "--state-dir", bed.state_dir("c1"), "--json", "-",
                            timeout=60))
    assert [d["id"] for d in out["devices"]] == [bed.status("c1")["node"]]
    for other in ("pub1", "r1", "p1", "s1"):
        # (which side is named, and punched or relayed, depends on the NAT pair and the moment)
        note = next((n for n in out["notes"] if n.startswith(f"{other}: left out, ")), None)
        assert note and re.fullmatch(rf"{other}: left out, (c1 reaches {other}|{other} reaches c1) only (punched|relayed)",
                                     note), out["notes"]
    from edgemesh.testbed.lifecycle import run_in_device

    res = run_in_device(bed.scenario, bed.names, bed.caps, "c1",
                        ["edgemesh", "plan", "tiny", "--store", store, "--state-dir", bed.state_dir("c1"), "--nodes", "2"],
                        capture=True, timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr  # 2: a usage/config error
    assert "--nodes 2: only 1 member(s) can share a tensor-parallel group" in res.stderr, res.stderr
    assert "pub1: left out" in res.stderr, res.stderr


def test_every_join_is_timed_per_pair(bed):
    """`bench join` reports these per pair; the issue's targets (< 2 s / < 3 s from the join
    command) are benchmark figures, checked there, not here. Here: each joined device has a
    measured time with every earlier member, and it connected while the test waited for it."""
    table = "\n".join(json.dumps(r) for r in bed.rows)
    joined = DEVICES[1:]
    assert len(bed.rows) == sum(range(1, len(DEVICES))), table  # 1 + 2 + 3 + 4 pairs
    for row in bed.rows:
        assert row["a"] in joined and row["path"] in ("direct", "punched", "relayed"), table
        assert 0 < row["seconds"] < 30 and 0 < row["seconds_after_daemon_start"] <= row["seconds"], table


@pytest.mark.parametrize("a,b,path", [("c1", "pub1", "direct"), ("c1", "r1", "punched"), ("s1", "p1", "relayed")])
def test_rpc_and_10_mib_transfer_over_each_path_type(bed, a, b, path):
    res = bed.link_test(a, b, 10 * 2**20, pings=3)
    assert res["path"] == path and res["path_after"] == path
    assert res["intact"] and res["rtt_ms"] > 0


def test_a_swarm_round_runs_over_punched_and_relayed_paths(bed):
    """c1 asks; r1, p1 and s1 answer and judge. Every pair among them is punched or relayed (each
    is behind its own NAT), so commits, reveals and judgments all cross NATs. Their model is an
    edgemesh API on pub1's public address (reached out through each NAT); pub1 itself has no
    swarm backend and is left out with that reason."""
    import subprocess
    import sys
    import time

    from edgemesh.testbed.lifecycle import device_argv, device_env

    members = ["c1", "r1", "p1", "s1"]
    paths = _paths(bed)
    assert all(paths[a][b] in ("punched", "relayed") for a in members for b in members if a != b), paths
    host = str(bed.plan.device_address("pub1"))
    server = subprocess.Popen(device_argv(bed.names, bed.caps, "pub1",
                                          [sys.executable, str(REPO / "tests" / "testbed" / "swarm_backend.py"),
                                           host, "8123", "tb-key"]),
                              env=device_env(bed.scenario, bed.names, "pub1"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:  # up once its /health answers (from inside pub1)
            res = subprocess.run(["ip", "netns", "exec", bed.names.device_ns("pub1"), sys.executable, "-c",
                                  "import urllib.request as u; u.urlopen(u.Request("
                                  f"'http://{host}:8123/health', headers={{'Authorization': 'Bearer tb-key'}}), timeout=2)"],
                                 capture_output=True)
            if res.returncode == 0:
                break
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read() if server.poll() else "slow"
            time.sleep(1)
        for dev in members:
            bed.em(dev, "swarm", "config", "--base-url", f"http://{host}:8123/v1", "--model", "tiny",
                   "--api-key", "tb-key", "--state-dir", bed.state_dir(dev))
        out = json.loads(bed.em("c1", "swarm", "ask", "Which is larger, 3 or 7?", "--json", "-", "--timeout", "90",
                                "--state-dir", bed.state_dir("c1"), timeout=400))
        ids = {m["name"]: m["id"] for m in bed.status("c1")["members"]}
        assert set(out["answers"]) == {ids[d] for d in members}, out["left_out"]
        assert "swarm backend" in out["left_out"][ids["pub1"]]
        assert out["winner"] in out["answers"] and len(out["judgments"]) >= 2 * 3 + 2 * 2
        assert all(j["judge"] not in (j["a"], j["b"]) for j in out["judgments"])
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_a_vit_split_runs_on_members_reached_only_punched_or_relayed(bed, tmp_path):
    """c1 is the master; r1, p1 and s1 reach it only punched or relayed. The split's parts are
    shipped to them over those paths, a batch of 64 digits goes out, the features come back, and
    the fused predictions equal the in-process fused model's."""
    import subprocess
    import sys
    from dataclasses import replace

    from edgemesh.testbed.lifecycle import device_argv, device_env
    from edgemesh.vit.datasets import load_dataset
    from edgemesh.vit.recipes import recipe_for, train_model
    from edgemesh.vit.split import SplitConfig, build_split
    from edgemesh.vit.store import save_split
    from edgemesh.vit.train import TrainConfig, torch_threads

    workers = ["r1", "p1", "s1"]
    paths = _paths(bed)
    assert all(paths["c1"][w] in ("punched", "relayed") and paths[w]["c1"] in ("punched", "relayed")
               for w in workers), paths
    quick = SplitConfig(finetune=TrainConfig(epochs=4, batch_size=64, lr=5e-3),
                        fusion=TrainConfig(epochs=6, batch_size=64, lr=4e-3), importance_samples=256)
    data = load_dataset("digits")
    with torch_threads(1):
        full = train_model(data, replace(recipe_for("digits"), train=TrainConfig(epochs=6, batch_size=64, lr=4e-3)))
        split = build_split(full, data, 4, quick)
    save_split(tmp_path / "digits-4", split)
    res = subprocess.run(device_argv(bed.names, bed.caps, "c1",
                                     [sys.executable, str(REPO / "tests" / "testbed" / "vit_master.py"),
                                      bed.state_dir("c1"), str(tmp_path / "digits-4"), ",".join(workers)]),
                         env=device_env(bed.scenario, bed.names, "c1"), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert sum(node in workers for node in out["parts"].values()) >= 2, out["parts"]
    assert out["missing"] == [] and out["predictions"] == out["reference"]
    accuracy = sum(p == y for p, y in zip(out["predictions"], out["labels"])) / len(out["labels"])
    assert accuracy >= 0.6, accuracy  # far above chance (0.1); tests/unit/test_vit.py holds the accuracy bar
    print(f"vit over NATs: parts {out['parts']}, accuracy {accuracy:.2f} on 64 digits")


def test_a_forged_channel_is_refused(bed):
    """p1 (a member) offers c1 a channel claiming to be r1, signed with its own key: refused."""
    before = bed.status("c1")["stats"]["refused_channels"]
    ids = {m["name"]: m["id"] for m in bed.status("c1")["members"]}
    code = f"""
import asyncio
from dataclasses import replace
from edgemesh.identity.statedir import StateDir
from edgemesh.mesh.rpc import RpcClient
from edgemesh.nat.binding import Signal, new_nonce, new_sid, now_ms
from edgemesh.transport.zmq_link import ZmqTransport
from edgemesh.identity.keys import curve_public_for
sd = StateDir({bed.state_dir('p1')!r}); key, _ = sd.load_identity(); cluster = sd.require_cluster()
pub = [r for r in sd.load_members() if r["name"] == "pub1"][0]
forged = Signal("offer", new_sid(), {ids['r1']!r}, {ids['c1']!r}, "u" * 4, "p" * 22, (), (("sha-256", "AA"),),
                new_nonce(), True, now_ms()).signed(cluster.cluster_id, key)
async def main():
    t = ZmqTransport(key); t.start()
    c = RpcClient(t.client(pub["addr"][0], curve_public_for(pub["key"])), bytes.fromhex(key.node_id))
    task = asyncio.ensure_future(c.run())
    await c.call("nat.signal", {{"to": {ids['c1']!r}, "signal": forged.encode()}}, timeout=5)
    task.cancel(); t.close()
asyncio.run(main())
"""
    from edgemesh.testbed.lifecycle import run_in_device

    res = run_in_device(bed.scenario, bed.names, bed.caps, "p1", [bed.caps.python, "-c", code], capture=True, timeout=30)
    assert res.returncode == 0, res.stderr
    deadline = time.monotonic() + 10
    while bed.status("c1")["stats"]["refused_channels"] <= before:
        assert time.monotonic() < deadline, "c1 did not refuse the forged signal"
        time.sleep(0.5)
    assert _paths(bed)["c1"]["r1"] == "punched"  # the real pair is untouched


def test_a_broken_punched_path_falls_back_to_the_relay_without_losing_the_rpc_then_upgrades(bed):
    """Mid-transfer, the UDP between c1's and r1's sites is cut: the pair moves to the relay,
    the request in flight is re-sent there (at-least-once with dedup by request id) and arrives intact;
    once the path is back, the relayed pair punches again by itself."""
    from concurrent.futures import ThreadPoolExecutor

    assert _paths(bed)["c1"]["r1"] == "punched"
    with ThreadPoolExecutor(1) as pool:
        transfer = pool.submit(bed.link_test, "c1", "r1", 6 * 2**20, 1)
        time.sleep(1.5)  # the transfer is under way (punched: ~2 MB/s)
        bed.cut_udp("cone", "restr", True)
        cut_at = time.monotonic()
        try:
            res = transfer.result(timeout=120)
            assert res["path"] == "punched" and res["path_after"] == "relayed", res
            assert res["intact"], res
            print(f"transfer finished over the relay {time.monotonic() - cut_at:.1f} s after the cut")
        finally:
            bed.cut_udp("cone", "restr", False)
    deadline = time.monotonic() + 60
    while _paths(bed)["c1"]["r1"] != "punched":
        assert time.monotonic() < deadline, "the relayed pair did not punch again after the path came back"
        time.sleep(1.0)


def test_killing_coturn_keeps_punched_pairs(bed):
    st = bed.statuses()
    pid = st["pub1"]["nat"]["turn_pid"]
    assert pid
    before = {(a, b): (link["path"], link["changes"]) for a, s in st.items()
              for b, link in NatBed.links_by_name(s).items() if link.get("path") in ("punched", "direct")}
    os.kill(pid, signal.SIGKILL)
    time.sleep(4.0)
    after = bed.statuses()
    for (a, b), (path, changes) in before.items():
        link = NatBed.links_by_name(after[a])[b]
        assert (link["path"], link["changes"]) == (path, changes), (a, b, link)
    assert bed.link_test("c1", "r1", 1 << 20, pings=2)["intact"]
    deadline = time.monotonic() + 15  # pub1 restarts coturn after 5 s; later tests need the relay
    while bed.status("pub1")["nat"]["turn_pid"] in (None, pid):
        assert time.monotonic() < deadline, "coturn was not restarted"
        time.sleep(1.0)


def test_a_natted_node_restarts_and_rejoins_every_pair(bed):
    """p1 stops and starts again: every pair with it gets a fresh path both ways (`bench join`
    reports the seconds against the issue's 5 s)."""
    restart = bed.restart("p1")
    assert 0 < restart["seconds"] < 30
    assert {p["peer"] for p in restart["pairs"]} == {"pub1", "c1", "r1", "s1"}
    paths = _paths(bed)
    assert paths["p1"]["c1"] == "punched" and paths["p1"]["s1"] == "relayed"
