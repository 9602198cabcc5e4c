"""Which members a launch uses: pure functions from what the daemons report (their ``status``:
members, profiles, links, and how each reaches the others) to the chosen members, master first,
and the planner's inputs. No I/O: ``runtime.deploy`` asks the daemons, then calls these.

A tensor-parallel group needs direct links both ways between every pair of its members
(``direct_island``); members named with ``--on`` are tried first; ``--nodes`` takes the first N.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from edgemesh.collective.costmodel import LOOPBACK_CURVE, LinkCost, for_links
from edgemesh.config import LaunchOptions
from edgemesh.errors import ConfigError
from edgemesh.mesh.links import PATHS
from edgemesh.placement.devices import Device, Link, link_between
from edgemesh.transport.endpoint import endpoint_host


# Paths on which a TCP connection opens from either side: what the collective (higher ranks dial
# lower ones), the job server and `llm.start` need. A punched or relayed pair has only its ICE
# channel, a control path; tensor parallelism, two allreduces per layer, stays on direct links
# (ARCHITECTURE.md: tensor-parallel groups only inside low-latency islands).
DIRECT_PATHS = ("lan", "direct")
PathMap = dict[str, dict[str, str | None]]  # paths[a][b]: how a reaches b ("lan", "punched", ...; None = none yet)


def direct_island(members: list[dict[str, Any]], me: str, paths: PathMap,
                  first: tuple[str, ...] = ()) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The alive members that can share a tensor-parallel group with ``me``: the ones in
    ``first`` (ids, e.g. those named with --on) are tried first, then the rest by name; each
    joins if it and every member taken before (``me`` first) reach each other directly, both
    ways. A member missing from ``paths`` did not say how it reaches the others. Returns
    (members kept, in input order, with the dead ones; the reason per left-out member id)."""
    def why_not(a: dict[str, Any], b: dict[str, Any]) -> str | None:
        for x, y in ((a, b), (b, a)):
            if x["id"] not in paths:
                return f"{x['name']} did not answer a status request"
            path = paths[x["id"]].get(y["id"])
            if path not in DIRECT_PATHS:
                return f"{x['name']} reaches {y['name']} {'over no path yet' if path is None else f'only {path}'}"
        return None

    alive = {m["id"]: m for m in members if m["state"] == "alive"}
    kept = [alive[me]] if me in alive else []
    left: dict[str, str] = {}
    rank = {i: k for k, i in enumerate(first)}
    for m in sorted((m for m in alive.values() if m["id"] != me),
                    key=lambda m: (rank.get(m["id"], len(rank)), m["name"], m["id"])):
        reason = next((r for r in (why_not(k, m) for k in kept) if r), None)
        if reason is None:
            kept.append(m)
        else:
            left[m["id"]] = reason
    return [m for m in members if m["id"] not in left], left


def named(members: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """The alive member called ``name`` (or whose id starts with it), if any."""
    return next((m for m in members if m["state"] == "alive" and (m["name"] == name or m["id"].startswith(name))), None)


def choose_members(members: list[dict[str, Any]], me: str, opts: LaunchOptions,
                   degraded: bool = False) -> list[dict[str, Any]]:
    """This node first (it is the master), then the others by name. ``degraded`` (after a
    failure) takes whatever is left of the requested set rather than refusing."""
    alive = [m for m in members if m["state"] == "alive"]
    mine = [m for m in alive if m["id"] == me]
    others = sorted((m for m in alive if m["id"] != me), key=lambda m: (m["name"], m["id"]))
    if opts.names:
        wanted = []
        for n in opts.names:
            hit = named(alive, n)
            if hit is None and degraded:
                continue
            if hit is None:
                raise ConfigError(f"no alive member named {n!r} (alive: {', '.join(m['name'] for m in alive)})")
            wanted.append(hit)
        others = [m for m in wanted if m["id"] != me]
    elif opts.nodes is not None:
        if opts.nodes < 1:
            raise ConfigError("--nodes must be at least 1")
        if opts.nodes - 1 > len(others) and not degraded:
            raise ConfigError(f"--nodes {opts.nodes}: only {len(others) + 1} member(s) are alive")
        others = others[: opts.nodes - 1]
    return mine + others


def host_of(m: dict[str, Any]) -> str:
    """The host of a member's first (mesh) address: members with the same one share a machine."""
    return endpoint_host(str(m["addresses"][0]))


def sharing(members: list[dict[str, Any]]) -> list[int]:
    """For each member, how many of the chosen members run on its machine (same address)."""
    count: dict[str, int] = {}
    for m in members:
        count[host_of(m)] = count.get(host_of(m), 0) + 1
    return [count[host_of(m)] for m in members]


# Work per second of a rank that time-shares its core with others, against its slice of that core:
# a switch at every allreduce, caches shared. SmolLM2 int8 / q4, 3 ranks on 2 cores, the master
# alone on one: the two others spent 0.70 / 0.80 CPU-seconds per unit of the split where the
# master spent 0.59 / 0.69 (its driving work included), and 0.75 (master 57 %) was fastest then.
# Since q4 prefills dequantize blocks into cache (``kernels.q4_linear``) the master's slice bounds
# its core for longer: of 0.75, 0.85, 0.9 and 0.95 (master 57, 54, 53, 51 %), 0.85 gave the
# fastest q4 prefills (0.90-1.01x one device over 8 runs, 0.90-1.06x at 0.75 over 11), with
# decode and int8 unchanged within the runs' spread (README, tenth session). At 50 % the master
# holds one KV group of three instead of two and the shared core's attention sets the wall.
TIME_SHARED = 0.85


def cores_of(m: dict[str, Any]) -> int:
    """Whole cores a member's machine gives it: its quota (cgroup) if any, else its logical cores."""
    profile = m.get("profile") or {}
    return int((profile.get("limits") or {}).get("cpu_cores") or profile.get("cpu_logical") or 1)


def machine_slots(members: list[dict[str, Any]]) -> list[tuple[tuple[int, int] | None, float]]:
    """For each member: the cores it is pinned to (slot ``(i, n)``: the i-th of n equal parts of
    the cores its process may use; None: not pinned) and its share of its machine's compute.

    - Alone on its machine: not pinned, all of it.
    - Sharing a machine of at least as many cores: disjoint equal parts, an equal share.
    - More members than cores (2 cores or more): one core each part; the machine's first
      member (the master, where it runs) has part 0 to itself, the others take parts 1.. in
      turn, and a member's share is its part's divided by how many share that part, times
      ``TIME_SHARED`` where that is more than one. Each core then carries about the same load
      and no rank waits for two others that time-share one core, which the scheduler's
      balancing does not prevent (SmolLM2, 3 ranks on 2 cores: see the README).
    - One core for several: not pinned, equal shares."""
    seen: dict[str, int] = {}
    out: list[tuple[tuple[int, int] | None, float]] = []
    for m, shared in zip(members, sharing(members)):
        cores = cores_of(m)
        j = seen.get(host_of(m), 0)
        seen[host_of(m)] = j + 1
        if shared == 1:
            out.append((None, 1.0))
        elif shared <= cores:
            out.append(((j, shared), 1.0 / shared))
        elif cores >= 2:
            part = 0 if j == 0 else 1 + (j - 1) % (cores - 1)
            on_part = 1 if part == 0 else len(range(part - 1, shared - 1, cores - 1))
            out.append(((part, cores), 1.0 / cores / on_part * (TIME_SHARED if on_part > 1 else 1.0)))
        else:
            out.append((None, 1.0 / shared))
    return out


def devices_and_links(members: list[dict[str, Any]]) -> tuple[list[Device], list[Link]]:
    """Planner inputs. Members on one machine measured the same hardware, each while the others
    may have been busy: they all get the machine's best measured speed and memory bandwidth,
    times their share of it (``machine_slots``)."""
    alone = [Device.from_profile(m["id"], m.get("profile") or {}) for m in members]
    best: dict[str, tuple[float, float]] = {}
    for m, d in zip(members, alone):
        g, b = best.get(host_of(m), (0.0, 0.0))
        best[host_of(m)] = (max(g, d.gflops), max(b, d.mem_bw_gbps))
    devices = []
    for m, d, shared, (_, share) in zip(members, alone, sharing(members), machine_slots(members)):
        if shared > 1:
            g, b = best[host_of(m)]
            d = replace(d, gflops=g * share, mem_bw_gbps=b * share)
        devices.append(d)
    me = members[0]["id"]
    links = []
    for m in members[1:]:
        link = m.get("links") or {}
        rtt = link.get("rtt_min_ms") or link.get("rtt_ms")  # the path's latency, not the noise on top
        if rtt is not None and link.get("mbps"):
            links.append(Link(me, m["id"], float(rtt), float(link["mbps"])))
    return devices, links


def one_machine(members: list[dict[str, Any]]) -> bool:
    """All ``members`` on one machine (the same address): their links are loopback."""
    return len({host_of(m) for m in members}) == 1


def group_cost(members: list[dict[str, Any]], devices: list[Device], links: list[Link]) -> LinkCost:
    """The collective cost model's link constants for a group of ``members`` (the master first;
    ``devices`` and ``links`` as ``devices_and_links`` gave them): loopback's when they all share
    the master's machine, else the slowest measured link from the master (a link not measured
    yet: what the two devices' profiles say). The master sends it to every worker: each rank
    picks the algorithm per message from it, and they must agree."""
    if one_machine(members):
        return LOOPBACK_CURVE
    over = [link_between(devices[0], d, links) for d in devices[1:]]
    return for_links([lk.rtt_ms for lk in over], [lk.bandwidth_mbit for lk in over])


def paths_of(view: Any, me: str) -> dict[str, str | None]:
    """How the node whose ``status`` this is reaches each other member; anything that is not a
    known path name counts as none (another member's status is untrusted input)."""
    out: dict[str, str | None] = {}
    for m in view["members"]:
        if m["id"] != me:
            links = m.get("links")
            path = links.get("path") if isinstance(links, dict) else None
            out[str(m["id"])] = path if path in PATHS else None
    return out


def refuse_left_out(options: LaunchOptions, members: list[dict[str, Any]], left: dict[str, str], notes: list[str],
                     can: int) -> None:
    """A launch that names a member left out of the island, or wants more members than it
    holds, is refused with the reasons (rather than planned without them)."""
    for n in options.names:
        hit = named(members, n)
        if hit is not None and hit["id"] in left:
            raise ConfigError(f"{n} cannot be in a tensor-parallel group with this node: {left[hit['id']]} "
                              f"(the group needs {' or '.join(DIRECT_PATHS)} links both ways; see README, Across NATs)")
    if left and options.nodes is not None and options.nodes > can:
        raise ConfigError("; ".join([f"--nodes {options.nodes}: only {can} member(s) can share a tensor-parallel "
                                     "group with this node (direct links both ways)", *notes]))



def paths_pending(status: dict[str, Any], paths: PathMap, excluded: set[str] | frozenset[str] = frozenset()) -> bool:
    """Whether the map is not complete yet: a path still being set up, or a member we reach
    directly that did not answer (worth waiting a moment for before leaving anyone out)."""
    alive = [m["id"] for m in status["members"] if m["id"] not in excluded and m["state"] == "alive"]
    return any(paths[x].get(y) is None for x in paths for y in alive if y != x) or \
        any(y not in paths and paths[status["node"]].get(y) in DIRECT_PATHS for y in alive)


@dataclass
class Selection:
    chosen: list[dict[str, Any]]  # master (this node) first
    notes: list[str]  # members left out, and why
    missing_profiles: list[str]  # names of chosen members that have not published a device profile yet


def select_members(status: dict[str, Any], paths: PathMap, options: LaunchOptions,
                   excluded: set[str] | frozenset[str] = frozenset()) -> Selection:
    """The members a launch from the node whose ``status`` this is uses. ``excluded`` members
    (lost in a failure) are out, and then the launch takes what is left rather than refusing;
    otherwise a launch asking for members it cannot have is a ``ConfigError`` with the reasons."""
    degraded = bool(excluded)
    members = [m for m in status["members"] if m["id"] not in excluded]
    first = tuple(hit["id"] for hit in (named(members, n) for n in options.names) if hit is not None)
    kept, left = direct_island(members, status["node"], paths, first)
    names = {m["id"]: m["name"] for m in members}
    notes = [f"{names[i]}: left out, {why}" for i, why in left.items()]
    if not degraded:
        refuse_left_out(options, members, left, notes, sum(m["state"] == "alive" for m in kept))
    chosen = choose_members(kept, status["node"], options, degraded=degraded)
    missing = [m["name"] for m in chosen if "mem_total" not in (m.get("profile") or {})]
    return Selection(chosen, notes, missing)
