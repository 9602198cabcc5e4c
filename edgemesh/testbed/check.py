"""``testbed check``: measure every shaped link and compare with what the scenario asked for.

Tolerances (from the issue): RTT within ±10 % + 0.5 ms, bandwidth within ±10 %, loss within
±1 percentage point on >= 2,000 packets. RTT over a link is twice its one-way delay. Each
link is measured from both ends (upload and download), one link at a time so measurements
do not share the host's CPUs with each other.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from edgemesh.testbed.addressing import WAN_GATEWAY, AddressPlan
from edgemesh.testbed.build import Layout, access_label, uplink_label
from edgemesh.testbed.executor import Executor, StepFailed
from edgemesh.testbed.scenario import LinkSpec
from edgemesh.testbed.shaping import End
from edgemesh.testbed.state import StateFile
from edgemesh.testbed.steps import Spawn
from edgemesh.testbed.teardown import TeardownReport, end_processes

PROBE_PORT = 5399
LOSS_PACKETS = 2000
RTT_PROBES = 30
RTT_PROBES_JITTER = 150
TCP_SECONDS = 2.0
# A direction out of tolerance is measured once more before it counts: the emulation shares the
# host's CPUs (other tests, CI), and a moment of contention is not a property of the link. A link
# that is really misconfigured fails both times.
ATTEMPTS = 2


@dataclass(frozen=True)
class Target:
    """One direction of one link: traffic goes from ``src`` to ``dst``."""

    link: str  # "dev1->lab"
    src: End
    src_ip: str
    dst: End
    dst_ip: str
    spec: LinkSpec
    upload: bool

    @property
    def want_rtt_ms(self) -> float:
        return 2.0 * self.spec.delay_ms

    @property
    def want_mbit(self) -> float | None:
        return self.spec.up_mbit if self.upload else self.spec.down_mbit


@dataclass
class LinkResult:
    link: str
    want_rtt_ms: float
    got_rtt_ms: float | None
    want_mbit: float | None
    got_mbit: float | None
    want_loss_pct: float
    got_loss_pct: float | None
    method: str = "tcp"
    ok: bool = False
    attempts: int = 1
    problems: list[str] = field(default_factory=list)


def rtt_ok(want: float, got: float) -> bool:
    return abs(got - want) <= 0.1 * want + 0.5


def mbit_ok(want: float, got: float) -> bool:
    return abs(got - want) <= 0.1 * want


def loss_ok(want: float, got: float) -> bool:
    return abs(got - want) <= 1.0


def judge(target: Target, rtt_ms: float | None, mbit: float | None, loss_pct: float | None,
          method: str = "tcp") -> LinkResult:
    res = LinkResult(target.link, target.want_rtt_ms, rtt_ms, target.want_mbit, mbit, target.spec.loss_pct, loss_pct, method)
    if target.upload:  # RTT is a property of the link, measured once from the inner end
        if rtt_ms is None:
            res.problems.append("no RTT sample came back")
        elif not rtt_ok(target.want_rtt_ms, rtt_ms):
            res.problems.append(f"RTT {rtt_ms:.2f} ms, want {target.want_rtt_ms:.2f} ±{0.1 * target.want_rtt_ms + 0.5:.2f}")
    if target.want_mbit is not None:
        if mbit is None:
            res.problems.append("TCP transfer measured nothing")
        elif not mbit_ok(target.want_mbit, mbit):
            res.problems.append(f"{mbit:.1f} Mbit/s, want {target.want_mbit:g} ±10 %")
    if loss_pct is None:
        res.problems.append("loss count never came back")
    elif not loss_ok(target.spec.loss_pct, loss_pct):
        res.problems.append(f"loss {loss_pct:.2f} %, want {target.spec.loss_pct:g} ±1 point")
    res.ok = not res.problems
    return res


def targets(lay: Layout) -> list[Target]:
    """Both directions of every link that is shaped at all (unshaped links have nothing to check)."""
    plan: AddressPlan = lay.addresses
    out: list[Target] = []
    for site in lay.scenario.sites:
        link = lay.link(uplink_label(site.name))
        if link.spec == LinkSpec():
            continue
        inner_ip, outer_ip = str(plan.router_wan(site.name)), str(WAN_GATEWAY)
        out.append(Target(f"{site.name}->wan", link.inner, inner_ip, link.outer, outer_ip, link.spec, True))
        out.append(Target(f"wan->{site.name}", link.outer, outer_ip, link.inner, inner_ip, link.spec, False))
    for dev in lay.scenario.devices:
        link = lay.link(access_label(dev.name))
        if link.spec == LinkSpec():
            continue
        inner_ip, outer_ip = str(plan.device_address(dev.name)), str(plan.router_lan(dev.site))
        out.append(Target(f"{dev.name}->{dev.site}", link.inner, inner_ip, link.outer, outer_ip, link.spec, True))
        out.append(Target(f"{dev.site}->{dev.name}", link.outer, outer_ip, link.inner, inner_ip, link.spec, False))
    return out


def _client(python: str, target: Target) -> dict[str, object]:
    spec = target.spec
    # Pace the loss probe well under the link's rate so it measures loss, not queue overflow.
    rate = target.want_mbit or 1000.0
    pps = min(2000.0, rate * 1e6 * 0.2 / (100 * 8))
    settle = 2 * (spec.delay_ms + spec.jitter_ms) / 1000.0 + 0.3
    argv = [
        "ip", "netns", "exec", target.src.netns, python, "-m", "edgemesh.testbed.probe", "client",
        "--target", target.dst_ip, "--port", str(PROBE_PORT),
        # Jitter widens the RTT spread: more samples keep the mean's error well inside tolerance.
        "--rtt", str((RTT_PROBES_JITTER if spec.jitter_ms else RTT_PROBES) if target.upload else 0),
        "--loss", str(LOSS_PACKETS), "--loss-pps", f"{pps:.0f}", "--settle", f"{settle:.3f}",
        "--tcp", str(TCP_SECONDS if target.want_mbit is not None else 0),
    ]
    if spec.loss_pct and target.want_mbit is not None:
        # TCP over a lossy link measures its congestion control (a real 50 Mbit/s link with
        # 2 % loss gives TCP ~15-40 Mbit/s too); the link's capacity is what we emulate.
        argv += ["--udp-mbit", f"{target.want_mbit:g}"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise StepFailed(f"probe on {target.link} failed: {result.stderr.strip().splitlines()[-1:]}")
    data: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return data


def run_check(lay: Layout, state: StateFile, python: str,
              on_link: Callable[[str], None] | None = None) -> tuple[bool, list[LinkResult]]:
    todo = targets(lay)
    servers: dict[tuple[str, str], Spawn] = {}
    for t in todo:
        key = (t.dst.netns, t.dst_ip)
        if key not in servers:
            servers[key] = Spawn(
                ("ip", "netns", "exec", t.dst.netns, python, "-m", "edgemesh.testbed.probe", "serve",
                 "--bind", t.dst_ip, "--port", str(PROBE_PORT)),
                label=f"probe {t.dst.netns} {t.dst_ip}", stage="check",
            )
    first_record = len(state.state.records)
    executor = Executor(state)
    results: list[LinkResult] = []
    try:
        for spawn in servers.values():
            executor.run(spawn)
        for t in todo:
            if on_link is not None:
                on_link(t.link)
            for attempt in range(1, ATTEMPTS + 1):
                data = _client(python, t)
                res = judge(t, _num(data.get("rtt_ms")), _num(data.get("mbit")), _num(data.get("loss_pct")),
                            str(data.get("method", "tcp")))
                res.attempts = attempt
                if res.ok:
                    break
            results.append(res)
    finally:
        probes = {r.pid: r.start_time for r in state.state.records[first_record:] if r.pid is not None}
        end_processes(probes, TeardownReport())
    return all(r.ok for r in results), results


def _num(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def report_json(ok: bool, results: list[LinkResult], disks: list[DiskResult] | None = None) -> dict[str, Any]:
    return {"ok": ok, "links": [asdict(r) for r in results], "disks": [asdict(d) for d in disks or []]}


# ---- disk read caps ------------------------------------------------------------------------------

DISK_PROBE_BYTES = 32 << 20
DISK_TOLERANCE = 0.15  # the throttle is exact over a second; a 32 MiB read at 45 MB/s takes ~0.75 s


@dataclass
class DiskResult:
    device: str
    want_mbyte_s: float
    got_mbyte_s: float | None
    ok: bool
    problem: str = ""


def judge_disk(device: str, want: float, got: float | None, enforced: bool) -> DiskResult:
    if not enforced:
        return DiskResult(device, want, got, False, "not enforced: no blkio/io controller, or the state dir is "
                                                   "not on a block device (tmpfs?)")
    if got is None:
        return DiskResult(device, want, None, False, "measurement failed")
    ok = got <= want * (1 + DISK_TOLERANCE)  # slower is the disk's own limit, not a broken cap
    return DiskResult(device, want, got, ok, "" if ok else f"read {got:.1f} MB/s, cap {want:g} MB/s")


def run_disk_checks(lay: Layout, python: str, caps: object) -> list[DiskResult]:
    """Each device with a disk cap reads a fresh, uncached file in its own state dir."""
    from edgemesh.testbed.cgroups import backing_disk
    from edgemesh.testbed.lifecycle import run_in_device

    names = lay.names
    layout = getattr(caps, "cgroups", None)
    enforced = layout is not None and layout.io_root is not None and backing_disk(names.run_root) is not None
    out = []
    for dev in lay.scenario.devices:
        if dev.disk_read_mbyte_s is None:
            continue
        got = None
        if enforced:
            where = names.run_dir  # on the disk of every device's state dir
            code = (f"from edgemesh.mesh.profile import measure_disk_read_mbps as m; "
                    f"print(m({str(where)!r}, {DISK_PROBE_BYTES}))")
            res = run_in_device(lay.scenario, names, caps, dev.name, [python, "-c", code],  # type: ignore[arg-type]
                                capture=True, timeout=120)
            got = _num(_float(res.stdout.strip().splitlines()[-1:] or ["nan"]))
        out.append(judge_disk(dev.name, dev.disk_read_mbyte_s, got, enforced))
    return out


def _float(lines: list[str]) -> float | None:
    try:
        value = float(lines[0])
    except ValueError:
        return None
    return value if value == value else None
