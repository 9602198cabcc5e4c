"""Deploy a model: ask the daemons, plan over the chosen members, ship each its slices, form the group.

This is the I/O half of a launch; which members take part is decided by the pure functions of
``placement.members`` (from the daemons' status and path map), the torch threads and cores per
rank by ``runtime.cpu``. It runs in the process that serves the API (the master, rank 0). Each worker's daemon gets an
`llm.start` with its job; the workers fetch their slices from our job server and report ready;
then every rank joins the collective group. On a failure of the group the engine calls
``recover``: stop what is left, drop the lost member, plan again over the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from typing import Any, Callable

import torch

from edgemesh.collective.base import LocalCollective
from edgemesh.collective.costmodel import LOOPBACK_CURVE, LinkCost
from edgemesh.config import ConfigError, LaunchOptions
from edgemesh.errors import EdgemeshError
from edgemesh.identity.keys import curve_public_for
from edgemesh.identity.statedir import StateDir
from edgemesh.llm.build import rank_files
from edgemesh.llm.model import Participant, decode_allreduce
from edgemesh.mesh.rpc import rpc_session
from edgemesh.placement.devices import Device, Link
from edgemesh.placement.budget import plan_with_budget
from edgemesh.placement.members import (DIRECT_PATHS, PathMap, devices_and_links, group_cost, host_of, one_machine,
                                        paths_of, paths_pending, select_members)
from edgemesh.placement.plan import Plan
from edgemesh.runtime.control import control_call
from edgemesh.runtime.cpu import ComputeThread, cpu_slots, threads_per_rank
from edgemesh.runtime.processes import running_daemon
from edgemesh.runtime.job_server import JobFailed, JobServer
from edgemesh.runtime.jobs import JobFile, JobSpec
from edgemesh.transport.addresses import address_for_peer
from edgemesh.transport.endpoint import endpoint_host, parse_endpoint, tcp_endpoint
from edgemesh.transport.zmq_link import ZmqTransport
from edgemesh.weights.provider import InMemoryProvider
from edgemesh.weights.quant import split_unit
from edgemesh.weights.shard import vocab_range
from edgemesh.weights.store import ModelEntry

log = logging.getLogger(__name__)


async def member_paths(transport: ZmqTransport, status: dict[str, Any], timeout: float = 3.0) -> PathMap:
    """How each alive member reaches the others: ours from our daemon's ``status``, theirs from
    their own (asked directly, so only members we reach directly; the rest cannot join a group
    with us anyway). A member that does not answer, or answers nonsense, is left out of the map."""
    me = status["node"]
    paths: PathMap = {me: paths_of(status, me)}
    sender = bytes.fromhex(me)

    async def ask(m: dict[str, Any]) -> None:
        try:
            async with rpc_session(transport, m["addresses"][0], curve_public_for(bytes.fromhex(m["key"])), sender) as client:
                reply, _ = await client.call("status", {}, timeout=timeout)
            paths[m["id"]] = paths_of(reply, m["id"])
        except Exception as exc:  # noqa: BLE001 — a member's failure to answer only leaves it out
            log.info("no usable status from %s: %s", m["name"], exc)

    await asyncio.gather(*(ask(m) for m in status["members"]
                           if m["id"] != me and m["state"] == "alive" and paths[me].get(m["id"]) in DIRECT_PATHS))
    return paths


async def members_with_profiles(state: StateDir, transport: ZmqTransport, options: LaunchOptions,
                                excluded: set[str] | frozenset[str] = frozenset(),
                                wait: float = 10.0, wait_paths: float = 3.0) -> tuple[list[dict[str, Any]], list[str]]:
    """The members a launch from ``state`` would use (master first; ``placement.members.select_members``),
    once each has published its device profile (a member that just started needs a moment for
    its record to reach us), and notes on the members left out because they cannot share a
    group with us (paths not known yet are waited for up to ``wait_paths`` seconds)."""
    start = time.monotonic()
    while True:
        status = await control_call(state, "status")
        paths = await member_paths(transport, status)
        if paths_pending(status, paths, excluded) and time.monotonic() - start < wait_paths:
            await asyncio.sleep(0.3)
            continue
        chosen = select_members(status, paths, options, excluded)
        if not chosen.missing_profiles:
            return chosen.chosen, chosen.notes
        if time.monotonic() - start > wait:
            raise EdgemeshError(f"no device profile from {', '.join(chosen.missing_profiles)} yet; "
                                "is it running an older edgemesh?")
        await asyncio.sleep(0.2)


async def live_devices(state: StateDir, options: LaunchOptions) -> tuple[list[dict[str, Any]], list[Device], list[Link], list[str]] | None:
    """The members, devices and links a launch from ``state`` would plan with (measured
    profiles and links), and why members were left out; None when no daemon runs there."""
    if running_daemon(state) is None:
        return None
    key, _ = state.load_identity()
    transport = ZmqTransport(key)
    transport.start()
    try:
        members, notes = await members_with_profiles(state, transport, options)
    finally:
        await transport.aclose()
    devices, links = devices_and_links(members)
    return members, devices, links, notes


class Deployment:
    def __init__(self, state: StateDir, entry: ModelEntry, options: LaunchOptions,
                 progress: Callable[[str], None] = lambda msg: None) -> None:
        self.state = state
        self.entry = entry
        self.options = options
        self.progress = progress
        self.key, self.name = state.load_identity()
        self.transport = ZmqTransport(self.key)
        self.plan: Plan | None = None
        self.link_cost: LinkCost = LOOPBACK_CURVE  # the group's cost model constants (group_cost)
        self.members: list[dict[str, Any]] = []
        self.job: str | None = None
        self.model: Participant | None = None
        self._server: JobServer | None = None
        self._server_task: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.excluded: set[str] = set()
        self.left_out: list[str] = []  # members that cannot share a group with this node, and why
        self.compute = ComputeThread()  # torch threads and cores of the thread that runs the model

    # ---- lifecycle -----------------------------------------------------------------
    async def open(self) -> None:
        rec = running_daemon(self.state)
        if rec is None:
            raise EdgemeshError(f"no edgemesh daemon runs for {self.state.path}; start it (`edgemesh start -d`) "
                                "or a local cluster (`edgemesh cluster up`)")
        self.loop = asyncio.get_running_loop()
        self.transport.start()
        control = endpoint_host(str(rec["control"]))
        # Our services listen where the daemon does (every interface by default) and each member
        # is told an address of ours that it can reach (``address_for``), never a loopback one
        # unless it runs on this machine.
        self.listen_host = str(rec.get("host") or control)
        self.advertise = str(rec.get("advertise") or control)
        self.advertise_explicit = bool(rec.get("advertise_explicit"))
        self._server = JobServer(self.transport, self.listen_host)
        self._server_task = asyncio.ensure_future(self._server.run())

    def address_for(self, member: dict[str, Any]) -> str:
        """The address of this node that ``member`` dials for our job server and rank 0's links."""
        try:
            return address_for_peer(host_of(member), self.listen_host, self.advertise, self.advertise_explicit)
        except ValueError as exc:
            raise ConfigError(f"{member['name']} cannot reach this node: {exc}") from None

    async def close(self) -> None:
        await self._stop_job(tell_workers=True)
        if self._server_task is not None:
            self._server_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._server_task
        await self.transport.aclose()

    # ---- deploy --------------------------------------------------------------------
    async def deploy(self) -> Participant:
        assert self._server is not None
        self.compute.assign(0, None)
        self.members = await self._members_with_profiles()
        devices, links = devices_and_links(self.members)
        self.plan = plan_with_budget(self.entry.config, devices, links, model=self.entry.name,
                                     context_len=self.options.max_seq_len, dtype_bytes=self.entry.param_bytes,
                                     budget_bytes=self.options.memory_budget, mlp_unit=split_unit(self.entry.dtype))
        world = self.plan.world_size
        self.progress(f"plan: {world} device(s), predicted {self.plan.latency.total_ms:.1f} ms/token")
        self.link_cost = group_cost(self.members, devices, links)  # rank r is members[r], as below
        threads = threads_per_rank(self.members)
        slots = cpu_slots(self.members)
        self.compute.assign(threads[0], slots[0])
        if world == 1:
            self.model = await asyncio.to_thread(self._master_model, self.plan, LocalCollective())
            return self.model
        job = secrets.token_hex(8)
        self.compute.limit_here()
        self.progress("slicing weights")
        refs = await asyncio.to_thread(lambda: [rank_files(self.entry, self.plan.specs_for(r), r, world) for r in range(world)])
        keys = [bytes.fromhex(m["key"]) for m in self.members]
        ours = [self.address_for(m) for m in self.members]  # rank r dials us at ours[r] (or a clear error)
        files = {ref.sha256: self.entry.root / ref.name for r in range(1, world) for ref in refs[r].values()}
        jstate = self._server.add(job, keys, files)
        from edgemesh.collective.members import CurveKeys
        from edgemesh.collective.tcp_links import SecureLinks, max_message_for

        links0 = SecureLinks.bind(tcp_endpoint(self.listen_host, 0), CurveKeys(self.key.curve_public, self.key.curve_secret),
                                  [curve_public_for(k) for k in keys], max_message=max_message_for(
                                      self.entry.config.hidden_size * self.options.max_seq_len * 4), job=job)
        port0 = parse_endpoint(links0.endpoint)[1]
        jstate.endpoints[0] = links0.endpoint
        jstate.rank0_for = {r: tcp_endpoint(ours[r], port0) for r in range(1, world)}
        self.job = job
        # Every rank on this machine: the group tries shared memory for its allreduces
        # (collective/shm.py); without it, prefills overlap their allreduces with compute.
        local = one_machine(self.members)
        group = None
        try:
            for r in range(1, world):
                spec = JobSpec(
                    job=job, rank=r, world=world, model=self.entry.name, config=self.entry.config.to_json(),
                    specs=[s.to_json() for s in self.plan.specs_for(r)],
                    files=tuple(JobFile(b, ref.sha256, ref.nbytes) for b, ref in refs[r].items()),
                    server=self._server.endpoint_for(ours[r]), server_key=self.key.sign_public, keys=tuple(keys),
                    max_seq_len=self.options.max_seq_len, timeout=self.options.timeout,
                    algorithm=self.options.algorithm, compression=self.options.compression, threads=threads[r],
                    cpu_slot=slots[r], window=self.plan.window, link_cost=(self.link_cost.a, self.link_cost.b),
                    shared_memory=local)
                self.progress(f"starting a worker on {self.members[r]['name']} ({self.members[r]['addresses'][0]})")
                try:
                    await self._call_member(self.members[r], "llm.start", spec.to_wire(), timeout=self.options.start_timeout)
                except EdgemeshError as exc:
                    raise JobFailed(f"{self.members[r]['name']} at {self.members[r]['addresses'][0]} did not start "
                                    f"its worker: {exc}") from None
            total = sum(f.stat().st_size for f in {p for p in files.values()})
            await self._wait_ready(jstate, total, ours)
            from edgemesh.collective.errors import CollectiveError
            from edgemesh.collective.group import CollectiveGroup, CollectiveOptions
            from edgemesh.collective.members import Peer

            peers = [Peer(r, e, curve_public_for(keys[r])) for r, e in sorted(jstate.endpoints.items()) if r != 0]
            options = CollectiveOptions(timeout=self.options.timeout, algorithm=self.options.algorithm,
                                        compression=self.options.compression, cost=self.link_cost,
                                        shared_memory=local)
            self.progress(f"forming the group: {world - 1} worker(s) connect to this node and each other, "
                          "then one allreduce")
            try:
                group = await asyncio.to_thread(CollectiveGroup, links0, 0, world, peers, options)
                # The first step, at once (a worker waits for the master's next op only
                # `--collective-timeout` seconds): our links show only the ranks that reached us,
                # this shows every rank reached every other.
                await asyncio.to_thread(probe_group, group, self.entry.config.hidden_size, 1)
            except CollectiveError as exc:
                # A worker that could not reach another says which, and why (it tries for the
                # group's connect timeout): wait for that rather than blame the rank we missed.
                await self._wait_failure(jstate, options.connect_timeout + 5.0)
                raise JobFailed(f"the group did not form: {self._worker_failure(jstate) or self._name_ranks(exc, jstate)}") from None
            self.model = await asyncio.to_thread(self._master_model, self.plan, group, refs[0])
            # Prefills overlap their allreduces with compute where the ranks share this machine
            # only (`local`): across devices (lan-4: 0.5-core devices, 300 Mbit/s) the halved messages cost
            # more CPU per prefill than the overlap hid (q8_0 wire: 1.67 s against 1.32-1.35 s).
            # Through shared memory (a local group's sockets left idle) the overlap only costs:
            # SmolLM2 q4 on 3 local ranks, 533-546 ms without against 626-651 ms with it.
            self.model.overlap_prefill = local and not group.shared_memory
        except BaseException:
            if group is None:
                links0.close(abandon=True)
            elif self.model is None:  # formed, but no model owns it yet
                group.close()
            await self._stop_job(tell_workers=False)
            raise
        self.progress(f"model up on {world} device(s): " + ", ".join(m["name"] for m in self.members))
        return self.model

    async def _wait_failure(self, jstate: Any, timeout: float, others: float = 3.0) -> None:
        """Until a worker reports a failure (at most ``timeout`` seconds), then a moment for the
        others' reports: the two ends of a link that failed tell different halves of the story."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if jstate.failure is not None:
                deadline = min(deadline, time.monotonic() + others)
                if len(jstate.failures) >= jstate.world - 1:
                    return
            jstate.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(jstate.changed.wait(), min(left, 1.0))

    def _worker_failure(self, jstate: Any) -> str | None:
        """What a worker reported, with member names for the ranks it mentions."""
        if jstate.failure is None:
            return None

        def one(r: int) -> str:
            return f"{self.members[r]['name']} (rank {r})" if 0 <= r < len(self.members) else f"rank {r}"

        def names(m: re.Match[str]) -> str:  # "rank 2" or "ranks [1, 2]"
            return ", ".join(one(int(r)) for r in re.findall(r"\d+", m.group(0)))

        text = "; ".join(jstate.failures) if jstate.failures else jstate.failure
        return re.sub(r"\branks \[[\d, ]*\]|\brank \d+", names, text)

    def _name_ranks(self, exc: Exception, jstate: Any) -> str:
        """A collective error with the members behind the ranks it names (and their endpoints)."""
        ranks = sorted(set(getattr(exc, "lost", ()) or ()) | set(getattr(exc, "waiting_for", ()) or ()))
        who = [f"{self.members[r]['name']} (rank {r}, links at {jstate.endpoints.get(r, '?')}, dials this node at "
               f"{jstate.rank0_for.get(r, '?')})" for r in ranks if 0 < r < len(self.members)]
        return f"{exc}" + (f" — {'; '.join(who)}" if who else "")

    @property
    def threads0(self) -> int:
        """Torch threads of the master's compute thread; 0 = torch's default."""
        return self.compute.threads

    def prepare_compute_thread(self) -> None:
        """Call on the thread that runs the model, after every deploy: its torch thread count
        (a per-thread setting for a thread that already ran torch ops — a pool thread kept 2
        intra-op threads beside a 1-thread worker on 2 cores) and, when ranks share the
        machine, its own cores (see ``runtime.cpu.cpu_slots``)."""
        self.compute.prepare()

    def release_compute_thread(self) -> None:
        """Undo ``prepare_compute_thread`` on a thread that goes back to other work (a pool)."""
        self.compute.release()

    async def _members_with_profiles(self) -> list[dict[str, Any]]:
        self.progress("asking the members for their status, profiles and links")
        members, self.left_out = await members_with_profiles(self.state, self.transport, self.options, self.excluded)
        return members

    def _master_model(self, the_plan: Plan, collective: Any, refs: dict | None = None) -> Participant:
        specs = the_plan.specs_for(0)
        refs = refs or rank_files(self.entry, specs, 0, the_plan.world_size)
        if the_plan.window:  # weights stream from the store through a window (--memory-budget)
            from edgemesh.weights.window import windowed_from_store

            provider: Any = windowed_from_store(self.entry, refs, 0, the_plan.window)
        else:
            provider = InMemoryProvider({b: self.entry.load_slice(ref) for b, ref in refs.items()})
        return Participant(self.entry.config, specs, provider, collective, max_seq_len=self.options.max_seq_len,
                           vocab=vocab_range(self.entry.config, specs, 0, the_plan.world_size))

    async def _wait_ready(self, jstate: Any, total: int, ours: list[str]) -> None:
        """Until every worker has its slices and reported ready. Fails, naming the member, when a
        worker does not reach our job server in time (it cannot reach the address it was given),
        when its process is gone (asked of its daemon every few seconds), or at the deadline."""
        start = time.monotonic()
        deadline = start + self.options.ready_timeout
        next_check = start + 3.0
        while not jstate.ready.is_set():
            jstate.changed.clear()
            served = sum(jstate.served.values())
            self.progress(f"workers fetching weights: {served / 1e6:.0f}/{total / 1e6:.0f} MB, "
                          f"{len(jstate.endpoints) - 1}/{jstate.world - 1} worker(s) ready")
            now = time.monotonic()
            waiting = [r for r in range(1, jstate.world) if r not in jstate.endpoints]
            silent = [r for r in waiting if r not in jstate.contacted]
            if silent and now - start > self.options.contact_timeout:
                raise JobFailed("; ".join(
                    f"{self.members[r]['name']} did not reach this node's job server at "
                    f"{self._server.endpoint_for(ours[r])} within {self.options.contact_timeout:.0f} s "  # type: ignore[union-attr]
                    "(is that address reachable from it? a firewall? see --advertise)" for r in silent))
            if now >= next_check:
                next_check = now + 3.0
                await self._check_workers_alive(jstate, waiting)
            if now >= deadline:
                names = ", ".join(self.members[r]["name"] for r in waiting)
                raise JobFailed(f"not ready within {self.options.ready_timeout:.0f} s: {names}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(jstate.changed.wait(), min(deadline - now, 1.0))
        if jstate.failure:
            raise JobFailed(f"a worker could not start: {jstate.failure}")

    async def _check_workers_alive(self, jstate: Any, ranks: list[int]) -> None:
        """A worker that crashed (or exited) before reporting ready fails the launch now, not at
        the deadline. A daemon that does not answer is not proof of anything: skipped."""
        async def check(r: int) -> None:
            m = self.members[r]
            try:
                reply = await self._call_member(m, "llm.jobs", {}, timeout=3.0)
            except EdgemeshError:
                return
            jobs = reply.get("jobs") if isinstance(reply, dict) else None
            if isinstance(jobs, list) and not any(isinstance(j, dict) and j.get("job") == jstate.job for j in jobs) \
                    and r not in jstate.endpoints and not jstate.ready.is_set():
                jstate.failure = jstate.failure or (
                    f"{m['name']}: its worker exited before it was ready (log: jobs/{jstate.job}-r{r}.log in "
                    f"{m['name']}'s state dir)")
                jstate.ready.set()

        await asyncio.gather(*(check(r) for r in ranks))

    async def _call_member(self, member: dict[str, Any], method: str, body: Any, timeout: float = 10.0) -> Any:
        async with rpc_session(self.transport, member["addresses"][0], curve_public_for(bytes.fromhex(member["key"])),
                               bytes.fromhex(self.key.node_id)) as client:
            reply, _ = await client.call(method, body, timeout=timeout)
            return reply

    async def _stop_job(self, tell_workers: bool) -> None:
        model, self.model = self.model, None
        if model is not None and tell_workers and model.collective.world_size > 1:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(model.stop_workers)
        if model is not None:
            with contextlib.suppress(Exception):
                model.collective.close()
            if hasattr(model.provider, "close"):  # a weight window's loader thread
                model.provider.close()
        if self.job is not None:
            for m in self.members[1:]:
                with contextlib.suppress(EdgemeshError):
                    await self._call_member(m, "llm.stop", {"job": self.job}, timeout=8.0)
            if self._server is not None:
                self._server.remove(self.job)
            self.job = None

    # ---- recovery (called from the engine's compute thread) -----------------------------
    def recover(self, exc: Exception) -> Participant:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(self._recover(exc), self.loop).result()

    async def _recover(self, exc: Exception) -> Participant:
        # PeerLost names the ranks known to be gone (also when another rank relayed it);
        # CollectiveTimeout names those we were waiting for.
        lost_ranks: set[int] = set(getattr(exc, "lost", ()) or ())
        lost_ranks.update(getattr(exc, "waiting_for", ()) or ())
        for r in lost_ranks:
            if 0 < r < len(self.members):
                self.excluded.add(self.members[r]["id"])
                log.warning("dropping %s from the plan", self.members[r]["name"])
        await self._stop_job(tell_workers=False)
        self.progress("re-planning over the remaining members")
        return await self.deploy()


def is_cluster_failure(exc: Exception) -> bool:
    from edgemesh.collective.errors import CollectiveError

    return isinstance(exc, CollectiveError)


def probe_allreduce(model: Participant, n: int) -> list[float]:
    """Master: time ``n`` allreduces of one decode step's hidden state through the live group
    (the workers follow a ``probe`` op). Seconds per allreduce."""
    return probe_group(model.collective, model.config.hidden_size, n)


def probe_group(collective: Any, hidden: int, n: int) -> list[float]:
    collective.broadcast_meta({"op": "probe", "n": n, "numel": hidden})
    x = torch.zeros(1, 1, hidden)
    allreduce = decode_allreduce(collective, hidden)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        allreduce(x)
        out.append(time.perf_counter() - t)
    return out


def keepalive(model: Participant) -> None:
    """While idle, ping the workers through the group (they time out otherwise, and a dead
    worker is found before the next request rather than during it)."""
    if model.collective.world_size > 1:
        model.collective.broadcast_meta({"op": "noop"})


