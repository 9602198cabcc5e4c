"""The README's path on a LAN, as a user types it: default flags only, three lan-4 devices.

`edgemesh init --detach` on dev1, `edgemesh join TOKEN --detach` on dev2 and dev3 (every daemon
listens on 0.0.0.0 and finds its own address), then `edgemesh launch MODEL --nodes 3` on dev1 and
the official openai client asks through it (streamed and plain). Then a worker's daemon restarts
and the model is launched again; then a member's collective port is blocked (nft drop) and the
launch must fail with a one-line reason naming that member, well within its deadline, leaving no
worker behind. (Before the fix, every worker dialled its own loopback and launch hung silently.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.testbed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DEVICES = ("dev1", "dev2", "dev3")
MODEL = "smollm2-135m-instruct"
QUESTION = "What is the capital of France? Answer in one sentence."

# Runs inside dev1's namespace: the API listens on dev1's loopback, as `launch` defaults to.
CLIENT = """
import json, sys, time, openai
c = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none", max_retries=0, timeout=300)
deadline = time.monotonic() + float(sys.argv[1])
while True:
    try:
        model = c.models.list().data[0].id
        break
    except Exception:
        if time.monotonic() > deadline:
            raise
        time.sleep(1)
msgs = [{"role": "user", "content": sys.argv[2]}]
plain = c.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0).choices[0].message.content
out = {"plain": plain}
if sys.argv[3] == "stream":
    parts = []
    for chunk in c.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    out["stream"] = "".join(parts)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def smollm2_gguf():
    from edgemesh.weights.bundled import bundled_path

    try:
        return bundled_path(MODEL)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"SmolLM2 is not installed ({exc}); ./scripts/setup installs it")


class Lan:
    """Three devices of a lan-4 bed, driven with the README's commands."""

    def __init__(self, bed) -> None:
        self.bed = bed

    def argv(self, device: str, *args: str) -> list[str]:
        from edgemesh.testbed.lifecycle import device_argv

        return device_argv(self.bed.names, self.bed.caps, device, ["edgemesh", *args])

    def env(self, device: str) -> dict[str, str]:
        from edgemesh.testbed.lifecycle import device_env

        return {**device_env(self.bed.scenario, self.bed.names, device), "COLUMNS": "200"}

    def em(self, device: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(device, *args), env=self.env(device), capture_output=True, text=True,
                              timeout=timeout)

    def ok(self, device: str, *args: str, timeout: float = 90) -> str:
        res = self.em(device, *args, timeout=timeout)
        assert res.returncode == 0, f"edgemesh {' '.join(args[:1])} on {device}: {res.stderr[-2000:]}"
        assert "Traceback" not in res.stderr, res.stderr
        return res.stdout

    def home(self, device: str) -> Path:
        return Path(self.bed.names.device_dir(device))

    def ns(self, device: str) -> str:
        return self.bed.names.device_ns(device)

    def status(self, device: str = "dev1") -> dict:
        return json.loads(self.ok(device, "status", "--json", "-"))

    def name(self, device: str) -> str:
        """The node name `init`/`join` chose (no --name: a default one)."""
        return next(m["name"] for m in self.status(device)["members"] if m.get("self"))

    def wait_lan(self, timeout: float = 90) -> None:
        """All three members alive and on a lan path from dev1, each having measured itself."""
        deadline = time.monotonic() + timeout
        while True:
            members = self.status()["members"]
            if len(members) == len(DEVICES) and all(
                    m["state"] == "alive" and (m.get("self") or (m.get("links") or {}).get("path") == "lan")
                    and "gflops" in (m.get("profile") or {}) for m in members):
                return
            assert time.monotonic() < deadline, json.dumps(members, indent=1)[:3000]
            time.sleep(2)

    def launch(self) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv("dev1", "launch", MODEL, "--nodes", "3"), env=self.env("dev1"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def ask(self, wait: float, stream: bool) -> dict:
        res = subprocess.run(["ip", "netns", "exec", self.ns("dev1"), sys.executable, "-c", CLIENT, str(wait),
                              QUESTION, "stream" if stream else "plain"],
                             capture_output=True, text=True, timeout=wait + 300)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(res.stdout)

    def workers_in(self, device: str) -> list[int]:
        pids = subprocess.run(["ip", "netns", "pids", self.ns(device)], capture_output=True, text=True).stdout.split()
        out = []
        for pid in map(int, pids):
            try:
                if "edgemesh.runtime.worker_main" in " ".join(psutil.Process(pid).cmdline()):
                    out.append(pid)
            except psutil.Error:
                pass
        return out


def _stop(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[str, str]:
    """End a launch we started (by its pid) the way Ctrl-C does, and collect its output."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


@pytest.mark.timeout(1500)  # three launches of a real model on 0.5-core devices
def test_readme_path_on_a_lan_with_default_flags(bring_up, smollm2_gguf, tmp_path):
    bed = bring_up(REPO / "emulation" / "lan-4.toml")
    lan = Lan(bed)
    from edgemesh.weights.gguf_import import import_gguf
    from edgemesh.weights.store import ModelStore

    try:
        token = lan.ok("dev1", "init", "--detach").strip().splitlines()[-1]
        for dev in DEVICES[1:]:
            lan.ok(dev, "join", token, "--detach")
        # The model, imported where dev1's `edgemesh model import` puts it (done here, outside
        # the device's 0.5-core cap, only to save time; the files are the same).
        import_gguf(ModelStore(lan.home("dev1") / "models"), smollm2_gguf, name=MODEL)
        lan.wait_lan()
        addresses = {m["name"]: m["addresses"][0] for m in lan.status()["members"]}
        assert all("127.0.0.1" not in a and "0.0.0.0" not in a for a in addresses.values()), addresses

        # 1. launch over three members; one plain and one streamed request through openai.
        proc = lan.launch()
        try:
            answers = lan.ask(wait=420, stream=True)
        finally:
            out, err = _stop(proc)
        assert "Paris" in answers["plain"] and "Paris" in answers["stream"], answers
        assert "over 3 device(s)" in err and "Traceback" not in err, err[-3000:]
        assert "forming the group" in err, err[-3000:]  # progress lines, also without a terminal
        assert proc.returncode == 0, err[-3000:]

        # 2. a worker's daemon restarts (`stop`, `start -d`); launching again works.
        lan.ok("dev2", "stop")
        lan.ok("dev2", "start", "--detach")
        lan.wait_lan()
        proc = lan.launch()
        try:
            answers = lan.ask(wait=420, stream=False)
        finally:
            _, err = _stop(proc)
        assert "Paris" in answers["plain"], answers
        assert "over 3 device(s)" in err, err[-3000:]

        # 3. A worker drops every incoming TCP connection but the mesh and join ports. Ranks
        # follow node names (random here) and higher ranks dial lower ones: the worker whose
        # name sorts first is rank 1, which rank 2 cannot reach. A clear error naming it and
        # its endpoint, not a hang.
        victim = min(DEVICES[1:], key=lan.name)
        victim_name = lan.name(victim)
        rules = ("table inet emblock {\n chain input {\n  type filter hook input priority 0; policy accept;\n"
                 "  ct state established,related accept\n  iif lo accept\n  tcp dport { 7700, 7701 } accept\n"
                 "  meta l4proto tcp drop\n }\n}\n")
        subprocess.run(["ip", "netns", "exec", lan.ns(victim), "nft", "-f", "-"], input=rules, text=True, check=True)
        t0 = time.monotonic()
        proc = lan.launch()
        try:
            _, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            _, err = _stop(proc)
            pytest.fail(f"launch with a blocked collective port did not fail within 240 s: {err[-3000:]}")
        seconds = time.monotonic() - t0
        assert proc.returncode != 0, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("edgemesh: error:") and victim_name in last and "tcp://" in last, err[-3000:]
        # Every worker it started was released.
        deadline = time.monotonic() + 30
        while any(lan.workers_in(d) for d in DEVICES[1:]) and time.monotonic() < deadline:
            time.sleep(1)
        assert not any(lan.workers_in(d) for d in DEVICES[1:]), [lan.workers_in(d) for d in DEVICES[1:]]
        print(f"blocked collective port: launch failed after {seconds:.1f} s: {last}")
    finally:
        for dev in DEVICES:
            lan.em(dev, "stop", timeout=60)
