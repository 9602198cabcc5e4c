"""Commands for one emulated link: the wire itself, bandwidth, delay/jitter and loss.

A link joins an *inner* end (device, or a site's router) and an *outer* end (router LAN
bridge, or the wan bridge). All shaping is placed at the inner end, so every number of a
device lives in the device's own namespace:

* upload bandwidth: HTB on the inner end's egress;
* download bandwidth: the inner end's ingress is redirected to an IFB device with HTB on it;
* delay/jitter: netem when the host has it (inner egress + outer egress), else the userspace
  delay wire (``edgemesh.testbed.wire``) between two TAPs — same scenario either way;
* loss: netem's ``loss`` when available, else an nft ``numgen random`` drop on the *egress*
  hook of each end (ingress would miss the download direction: packets redirected to an IFB
  skip the netdev ingress hook). IP only: dropping ARP would turn loss into multi-second
  stalls, which real lossy links do not have. GSO is limited to one segment on lossy ends,
  else one drop would take out a 64 KiB burst of ~44 segments.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from edgemesh.testbed.scenario import LinkSpec
from edgemesh.testbed.steps import Run, Spawn, Step

# HTB's default quantum (rate / r2q) is huge at hundreds of Mbit/s and makes the kernel
# complain; one that holds a few full frames keeps the shaping smooth.
_HTB_QUANTUM = 30_000
_LOSS_SCALE = 100_000
_QUEUE_PACKETS = 1000  # numgen modulus: loss resolution of 0.001 %


@dataclass(frozen=True)
class End:
    netns: str
    ifname: str


@dataclass(frozen=True)
class LinkPlan:
    """How one link is realised; ``wire`` is the delay process when netem is missing."""

    inner: End
    outer: End
    spec: LinkSpec
    ifb: str
    netem: bool
    label: str

    @property
    def uses_wire(self) -> bool:
        return self.spec.needs_delay and not self.netem


def _ip(netns: str, *args: str) -> tuple[str, ...]:
    return ("ip", "-n", netns, *args)


def _tc(netns: str, *args: str) -> tuple[str, ...]:
    return ("ip", "netns", "exec", netns, "tc", *args)


def create_steps(link: LinkPlan, stage: str) -> list[Step]:
    """Create both ends (veth pair, or two TAPs for the wire); configuring them comes later."""
    i, o = link.inner, link.outer
    if link.uses_wire:
        return [
            Run(_ip(i.netns, "tuntap", "add", "dev", i.ifname, "mode", "tap"), stage),
            Run(_ip(o.netns, "tuntap", "add", "dev", o.ifname, "mode", "tap"), stage),
        ]
    return [Run(_ip(i.netns, "link", "add", i.ifname, "type", "veth", "peer", "name", o.ifname, "netns", o.netns), stage)]


def _htb(netns: str, ifname: str, mbit: float, netem: tuple[str, ...] | None) -> list[tuple[str, ...]]:
    rate = f"{mbit:g}mbit"
    cmds = [
        _tc(netns, "qdisc", "replace", "dev", ifname, "root", "handle", "1:", "htb", "default", "10"),
        _tc(netns, "class", "add", "dev", ifname, "parent", "1:", "classid", "1:10", "htb",
            "rate", rate, "ceil", rate, "quantum", str(_HTB_QUANTUM)),
    ]
    if netem:
        cmds.append(_tc(netns, "qdisc", "add", "dev", ifname, "parent", "1:10", "handle", "10:", "netem", *netem))
    else:
        # Explicit queue length: the default follows the device's txqueuelen (32 on IFB).
        cmds.append(_tc(netns, "qdisc", "add", "dev", ifname, "parent", "1:10", "handle", "10:",
                        "pfifo", "limit", str(_QUEUE_PACKETS)))
    return cmds


def _netem_args(spec: LinkSpec) -> tuple[str, ...]:
    args: list[str] = ["limit", "10000"]
    if spec.needs_delay:
        args += ["delay", f"{spec.delay_ms:g}ms"]
        if spec.jitter_ms:
            args += [f"{spec.jitter_ms:g}ms"]
    if spec.loss_pct:
        args += ["loss", f"{spec.loss_pct:g}%"]
    return tuple(args)


def _loss_ruleset(table: str, ifname: str, loss_pct: float) -> str:
    threshold = round(loss_pct / 100.0 * _LOSS_SCALE)
    return (
        f"table netdev {table} {{\n"
        f"  chain egress {{\n"
        f"    type filter hook egress device \"{ifname}\" priority -500; policy accept;\n"
        f"    meta protocol {{ ip, ip6 }} numgen random mod {_LOSS_SCALE} < {threshold} drop\n"
        f"  }}\n"
        f"}}\n"
    )


def shaping_steps(link: LinkPlan, loss_table_prefix: str, stage: str) -> list[Step]:
    """Bandwidth, delay and loss on an already configured (up) link."""
    i, o, spec = link.inner, link.outer, link.spec
    cmds: list[tuple[str, ...]] = []
    steps: list[Step] = []
    netem = _netem_args(spec) if link.netem and (spec.needs_delay or spec.loss_pct) else None

    # inner -> outer (upload)
    if spec.up_mbit is not None:
        cmds += _htb(i.netns, i.ifname, spec.up_mbit, netem)
    elif netem:
        cmds.append(_tc(i.netns, "qdisc", "replace", "dev", i.ifname, "root", "netem", *netem))
    # outer -> inner: delay/loss at the outer end's egress (netem only)
    if netem:
        cmds.append(_tc(o.netns, "qdisc", "replace", "dev", o.ifname, "root", "netem", *netem))
    # outer -> inner (download) bandwidth: IFB on the inner end's ingress
    if spec.down_mbit is not None:
        cmds += [
            # IFB's default queue is 32 packets: far too short for a shaped TCP flow, which
            # would see drops long before the rate limit (measured: 80-240 of 300 Mbit/s).
            _ip(i.netns, "link", "add", link.ifb, "txqueuelen", str(_QUEUE_PACKETS), "type", "ifb"),
            _ip(i.netns, "link", "set", link.ifb, "up"),
            _tc(i.netns, "qdisc", "add", "dev", i.ifname, "handle", "ffff:", "ingress"),
            # u32 "match everything": matchall is not built into every kernel (not this one).
            _tc(i.netns, "filter", "add", "dev", i.ifname, "parent", "ffff:", "protocol", "all",
                "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", link.ifb),
        ]
        cmds += _htb(i.netns, link.ifb, spec.down_mbit, None)
    steps += [Run(c, stage) for c in cmds]

    if spec.loss_pct and not link.netem:
        for end in (i, o):
            steps.append(Run(_ip(end.netns, "link", "set", "dev", end.ifname, "gso_max_segs", "1"), stage))
            table = f"{loss_table_prefix}_{end.ifname}"
            steps.append(Run(("ip", "netns", "exec", end.netns, "nft", "-f", "-"), stage,
                             stdin=_loss_ruleset(table, end.ifname, spec.loss_pct)))
    return steps


def wire_spawn(link: LinkPlan, python: str, stage: str, log: str | None) -> Spawn:
    """The userspace delay element for a link; it lives in the outer namespace so that a sweep
    of our namespaces' pids finds it even without the state file."""
    i, o, spec = link.inner, link.outer, link.spec
    argv = (
        "ip", "netns", "exec", o.netns, python or sys.executable, "-m", "edgemesh.testbed.wire",
        "--a", f"{i.netns}:{i.ifname}", "--b", f"{o.netns}:{o.ifname}",
        "--delay-ms", f"{spec.delay_ms:g}", "--jitter-ms", f"{spec.jitter_ms:g}",
    )
    if not spec.loss_pct:
        argv += ("--offload",)
    return Spawn(argv, label=f"wire {link.label}", stage=stage, log=log)
