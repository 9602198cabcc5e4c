"""Per-peer ICE sessions: signalling through members, identity binding, upgrades, fallback.

Which pairs need ICE is decided by ``mesh.peers``: a peer whose advertised address does not
answer. For those, one side sends a signed offer, the other a signed answer, through the
*signalling mailbox* of any member both reach (``nat.signal`` drops a signal there, each node
long-polls the members it reaches directly with ``nat.poll``). Then ICE, DTLS, SCTP, and the
hello that binds the channel to both node keys (``binding``). The channel is handed to the
peer's ``ChannelRpc``; when it breaks, the peer is wanted again (a new session, which falls
back to TURN if punching no longer works) and unanswered requests are re-sent on the next one.

Glare (both sides offer at once): the offer from the smaller node id wins. Relayed pairs are
re-tried without TURN in the background (by the smaller id), and upgraded when that works.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from edgemesh.errors import AuthError, EdgemeshError, ProtocolError
from edgemesh.identity.keys import NodeKey, curve_public_for
from edgemesh.mesh.peers import PeerLink, PeerSet
from edgemesh.nat.binding import Signal, check_hello, check_signal, decode_signal, make_hello, new_nonce, new_sid, now_ms
from edgemesh.nat.channel_rpc import KEEPALIVE
from edgemesh.nat.framing import encode_frames
from edgemesh.nat.mailbox import Mailbox
from edgemesh.nat.servers import IceServer
from edgemesh.nat.turn import rest_credential
from edgemesh.rpc.dispatch import Call
from edgemesh.wire.envelope import Envelope, Kind, encode_message
from edgemesh.wire.schema import body_map, maybe, need

log = logging.getLogger(__name__)

GATHER_TIMEOUT = 6.0  # aioice waits up to 5 s for an unreachable STUN/TURN server
ANSWER_TIMEOUT = 4.0
CONNECT_TIMEOUT = 6.0
PUNCH_TIMEOUT = 2.0  # a first attempt without TURN: hole punching answers in well under a second
# Happy eyeballs: a punch attempt not through ICE this long after the answer arrived gets a
# relayed session beside it. Punching answers in 0.02-0.3 s (STUN retries every 0.5 s);
# waiting for the punch to time out first made relayed pairs take 2.5 s longer.
RELAY_AFTER = 0.35
HELLO_TIMEOUT = 3.0
POLL_WAIT = 8.0
KEEPALIVE_EVERY = 1.0  # also what holds the NAT mappings open
SILENCE_LIMIT = 5.0  # a channel with no traffic for this long is dead: keep-alives arrive every second each way
BACKOFF = (0.2, 5.0)  # retry delay after a failed session: first, max
UPGRADE_EVERY = (3.0, 60.0)  # relayed pairs try to punch: first delay, max


@dataclass
class TraversalStats:
    sessions: int = 0
    connected: dict[str, int] = field(default_factory=dict)
    failed: int = 0
    refused_channels: int = 0
    bad_signals: int = 0
    upgrades: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"sessions": self.sessions, "connected": dict(self.connected), "failed": self.failed,
                "refused_channels": self.refused_channels, "bad_signals": self.bad_signals,
                "upgrades": self.upgrades}


@dataclass
class _Outgoing:
    sid: bytes
    answer: asyncio.Future[Signal]
    task: asyncio.Task[None] | None = None
    upgrade: bool = False


ServersFn = Callable[[], "tuple[IceServer | None, IceServer | None]"]


class Traversal:
    def __init__(self, key: NodeKey, cluster_id: str, peers: PeerSet, key_of: Callable[[str], bytes | None],
                 node_of: Callable[[bytes], str | None], servers: ServersFn, turn_secret: str | None,
                 refresh_view: Callable[[str], Awaitable[None]]) -> None:
        self.key = key
        self.me = key.node_id
        self.cluster_id = cluster_id
        self.peers = peers
        self.key_of = key_of  # node id -> ed25519 key of a current member
        self.node_of = node_of  # CURVE key of a caller -> node id
        self.servers = servers
        self.turn_secret = turn_secret
        self.refresh_view = refresh_view
        self.mailbox = Mailbox()
        self.stats = TraversalStats()
        self.epoch = secrets.token_bytes(8)  # this daemon's incarnation, told to relays when polling
        # Sessions under way, by (peer, relay): a punch and a relayed session may run side by side.
        self._outgoing: dict[tuple[str, bool], _Outgoing] = {}
        self._answering: dict[tuple[str, bool], asyncio.Task[None]] = {}
        self._channels: dict[str, Any] = {}
        self._retry_at: dict[str, tuple[float, float]] = {}  # peer -> (not before, last delay)
        self._upgrade_at: dict[str, tuple[float, float]] = {}
        self._polls: dict[str, asyncio.Task[None]] = {}
        self._poller_epochs: dict[str, bytes] = {}
        self._seen_offers: dict[bytes, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        # Peers that could not be punched: their next session gathers TURN candidates too. A first
        # session without them cannot get pinned to a relay pair that merely answered first.
        self._needs_relay: set[str] = set()
        self._keepalive = encode_frames(encode_message(Envelope(Kind.NOTIFY, KEEPALIVE, 0, bytes.fromhex(self.me))))

    # ---- the loop --------------------------------------------------------------
    async def run(self) -> None:
        last = time.monotonic()
        try:
            while True:
                self._reconcile()
                await asyncio.sleep(0.05)
                now = time.monotonic()
                if now - last > 1.0:  # a starved or blocked loop looks like silent channels
                    log.warning("event loop lagged %.1f s", now - last - 0.05)
                last = now
        finally:
            await self.close()

    def _reconcile(self) -> None:
        links = {link.node_id: link for link in self.peers.clients()}
        for relay in list(self._polls):
            link = links.get(relay)
            if link is None or not link.direct:
                self._polls.pop(relay).cancel()
        for node_id in list(self._channels):
            if node_id not in links:
                self._spawn(self._channels.pop(node_id).close())
        now = time.monotonic()
        for node_id, link in links.items():
            if link.direct and node_id not in self._polls:
                self._polls[node_id] = self._spawn(self._poll(link))
            if link.direct is False and not link.rpc.connected:
                self._want(node_id)
            elif (link.rpc.connected and link.ice_path == "relayed" and not link.direct and self.me < node_id
                  and not self._busy(node_id)):
                at, delay = self._upgrade_at.setdefault(node_id, (now + UPGRADE_EVERY[0], UPGRADE_EVERY[0]))
                if now >= at:
                    delay = min(delay * 2, UPGRADE_EVERY[1])
                    self._upgrade_at[node_id] = (now + delay, delay)
                    self._start_offer(node_id, relay=False, upgrade=True)

    def _busy(self, peer: str) -> bool:
        return any(key[0] == peer for key in (*self._outgoing, *self._answering))

    def _want(self, peer: str, force: bool = False) -> None:
        """Start a session with ``peer`` unless one is under way (or we are backing off)."""
        if self._busy(peer):
            return
        at, _ = self._retry_at.get(peer, (0.0, 0.0))
        if not force and time.monotonic() < at:
            return
        self._start_offer(peer, relay=peer in self._needs_relay)

    def _start_offer(self, peer: str, relay: bool, upgrade: bool = False) -> None:
        if (peer, relay) in self._outgoing:
            return
        out = _Outgoing(new_sid(), asyncio.get_running_loop().create_future(), upgrade=upgrade)
        self._outgoing[(peer, relay)] = out
        out.task = self._spawn(self._offer(peer, out, relay))

    def _can_relay(self) -> bool:
        return self.servers()[1] is not None

    def _relay_soon(self, peer: str, connecting: asyncio.Future[Any]) -> None:
        """Happy eyeballs: if the punch is not through ICE in ``RELAY_AFTER``, relay beside it."""
        def fire() -> None:
            # Not when the peer's own relayed offer is being answered: ours would collide with it
            # (glare) and could cancel a relayed session that is nearly up.
            if (not connecting.done() and self._can_relay() and peer not in self._channels
                    and (peer, True) not in self._answering):
                self._start_offer(peer, relay=True)

        handle = asyncio.get_running_loop().call_later(RELAY_AFTER, fire)
        connecting.add_done_callback(lambda _: handle.cancel())

    def _failed(self, peer: str) -> None:
        self.stats.failed += 1
        _, last = self._retry_at.get(peer, (0.0, 0.0))
        delay = min(max(last * 2, BACKOFF[0]), BACKOFF[1])
        self._retry_at[peer] = (time.monotonic() + delay, delay)

    # ---- sessions ----------------------------------------------------------------
    def _channel(self, relay: bool) -> Any:
        from edgemesh.nat.ice import IceChannel

        stun, turn = self.servers()
        cred = None
        if turn is not None and relay:
            cred = (rest_credential(self.turn_secret, self.me) if turn.username is None and self.turn_secret else None)
            if turn.username is not None:
                from edgemesh.nat.turn import TurnCredential

                cred = TurnCredential(turn.username, turn.password or "")
        return IceChannel(stun, turn, cred, use_relay=relay, relay_only=relay and cred is not None)

    async def _offer(self, peer: str, out: _Outgoing, relay: bool) -> None:
        self.stats.sessions += 1
        ch = self._channel(relay)
        attached = False
        answered = False
        try:
            local = await asyncio.wait_for(ch.gather(), GATHER_TIMEOUT)
            offer = Signal("offer", out.sid, self.me, peer, local.ufrag, local.pwd, local.candidates,
                           local.fingerprints, new_nonce(), relay, now_ms()).signed(self.cluster_id, self.key)
            await self._deliver(peer, offer.encode())
            answer = await asyncio.wait_for(out.answer, ANSWER_TIMEOUT)
            answered = True
            ice = asyncio.ensure_future(ch.connect_ice(answer.ufrag, answer.pwd, answer.candidates, controlling=True))
            if not relay and not out.upgrade:
                self._relay_soon(peer, ice)
            await asyncio.wait_for(self._connect(ch, ice, answer.fingerprints), CONNECT_TIMEOUT if relay else PUNCH_TIMEOUT)
            await self._bind(ch, offer, answer, peer)
            attached = self._attach(peer, ch)
            if attached and out.upgrade:
                self.stats.upgrades += 1
        except (asyncio.TimeoutError, ConnectionError, EdgemeshError, OSError) as exc:
            log.info("ICE session with %s failed%s: %s", peer, " (upgrade)" if out.upgrade else "",
                     type(exc).__name__ if isinstance(exc, asyncio.TimeoutError) else exc)
            if not out.upgrade:
                if answered and not relay:
                    self._needs_relay.add(peer)  # punching failed: from now on relay beside it at once
                    self._retry_at[peer] = (0.0, 0.0)
                else:
                    self._failed(peer)
        finally:
            if self._outgoing.get((peer, relay)) is out:
                del self._outgoing[(peer, relay)]
            if not attached:
                await ch.close()

    @staticmethod
    async def _connect(ch: Any, ice: asyncio.Future[Any], fingerprints: tuple[tuple[str, str], ...]) -> None:
        try:
            await ice
        except BaseException:
            ice.cancel()
            raise
        await ch.connect_dtls(fingerprints)

    async def _answer(self, offer: Signal) -> None:
        peer = offer.sender
        self.stats.sessions += 1
        ch = self._channel(offer.relay)
        attached = False
        try:
            local = await asyncio.wait_for(ch.gather(), GATHER_TIMEOUT)
            answer = Signal("answer", offer.sid, self.me, peer, local.ufrag, local.pwd, local.candidates,
                            local.fingerprints, new_nonce(), offer.relay, now_ms()).signed(self.cluster_id, self.key)
            await self._deliver(peer, answer.encode())
            ice = asyncio.ensure_future(ch.connect_ice(offer.ufrag, offer.pwd, offer.candidates, controlling=False))
            await asyncio.wait_for(self._connect(ch, ice, offer.fingerprints),
                                   CONNECT_TIMEOUT if offer.relay else PUNCH_TIMEOUT)
            await self._bind(ch, offer, answer, peer)
            attached = self._attach(peer, ch)
        except (asyncio.TimeoutError, ConnectionError, EdgemeshError, OSError) as exc:
            log.info("answering %s failed: %s", peer,
                     type(exc).__name__ if isinstance(exc, asyncio.TimeoutError) else exc)
            if offer.relay:
                self._failed(peer)
            else:
                self._needs_relay.add(peer)
        finally:
            if self._answering.get((peer, offer.relay)) is asyncio.current_task():
                del self._answering[(peer, offer.relay)]
            if not attached:
                await ch.close()

    async def _bind(self, ch: Any, offer: Signal, answer: Signal, peer: str) -> None:
        """The hello: prove our key over the session, check the peer's (``AuthError`` refuses)."""
        await ch.send(make_hello(self.cluster_id, self.key, offer, answer, self.me, peer))
        first = await asyncio.wait_for(ch.recv(), HELLO_TIMEOUT)
        if first is None:
            raise ConnectionError("the channel closed before the peer's hello")
        key = self.key_of(peer)
        if key is None:
            raise AuthError(f"{peer} is no longer a member")
        try:
            check_hello(self.cluster_id, first, key, offer, answer, self.me, peer)
        except (AuthError, ProtocolError) as exc:
            self.stats.refused_channels += 1
            log.warning("refused an ICE channel claiming to be %s: %s", peer, exc)
            raise

    def _attach(self, peer: str, ch: Any) -> bool:
        link = self.peers.get(peer)
        key = self.key_of(peer)
        if link is None or key is None:
            return False
        old = self._channels.get(peer)
        if old is not None and ch.path == "relayed" and old.path != "relayed" and not old.closed.is_set():
            return False  # the punch beside this relayed session won: keep it
        if ch.path != "relayed":  # a relayed session beside this successful punch is not needed
            me = asyncio.current_task()
            for task in [o.task for (p, r), o in self._outgoing.items() if p == peer and r]:
                if task is not None and task is not me:
                    task.cancel()
            for task in [t for (p, r), t in self._answering.items() if p == peer and r]:
                if task is not me:
                    task.cancel()
        self._channels[peer] = ch
        link.rpc.attach(ch, curve_public_for(key))
        link.set_ice(ch.path)
        self._retry_at.pop(peer, None)
        if ch.path != "relayed":
            self._needs_relay.discard(peer)
        self.stats.connected[ch.path] = self.stats.connected.get(ch.path, 0) + 1
        log.info("ICE channel to %s up: %s", peer, ch.path)
        self._spawn(self._pump(peer, ch, link))
        if old is not None and old is not ch:
            self._spawn(old.close())
        return True

    async def _pump(self, peer: str, ch: Any, link: PeerLink) -> None:
        keeper = self._spawn(self._keep_alive(ch))
        heard = time.monotonic()
        try:
            while True:
                try:
                    message = await asyncio.wait_for(ch.recv(), 1.0)
                except asyncio.TimeoutError:
                    if ch.dead():
                        log.info("ICE channel to %s closed by the peer", peer)
                        break
                    if time.monotonic() - max(heard, ch.heard) > SILENCE_LIMIT:
                        log.info("ICE channel to %s silent for %.0f s; closing it (%s)", peer, SILENCE_LIMIT,
                                 ch.diagnosis())
                        break
                    continue
                if message is None:
                    break
                heard = time.monotonic()
                link.rpc.on_message(message)
        finally:
            keeper.cancel()
            link.rpc.detach(ch)
            if self._channels.get(peer) is ch:
                del self._channels[peer]
                link.set_ice(None)
                self._retry_at.pop(peer, None)  # want it back at once (e.g. via the relay)
            await ch.close()

    async def _keep_alive(self, ch: Any) -> None:
        while True:
            await asyncio.sleep(KEEPALIVE_EVERY)
            try:
                await ch.send(self._keepalive)
            except ConnectionError:
                return

    # ---- signalling --------------------------------------------------------------
    async def _deliver(self, peer: str, signal: bytes) -> None:
        """Drop ``signal`` for ``peer`` at every member that may relay it (duplicates are harmless).

        Members not probed yet count as relays: a daemon that has just started sends its first
        offers before its probes have told it which members it reaches, and an offer left only
        in its own mailbox is lost (the pair then waits out the answer timeout). Returns once one
        relay has taken the signal (or all have failed): starting ICE checks before the signal is
        out slowed the relayed pair's set-up by ~0.5 s on a 0.5-core device; a slow or unreachable
        relay holds up nothing, its delivery goes on in the background.
        """
        self.mailbox.put(peer, signal)  # in case the peer polls us
        relays = [link for link in self.peers.clients() if link.direct is not False]

        async def one(link: PeerLink) -> bool:
            try:
                await link.client.call("nat.signal", {"to": peer, "signal": signal}, timeout=2.0)
                return True
            except EdgemeshError as exc:
                log.debug("relay %s did not take a signal: %s", link.node_id, exc)
                return False

        pending = {self._spawn(one(link)) for link in relays}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(not t.cancelled() and t.result() for t in done):
                return

    async def _poll(self, relay: PeerLink) -> None:
        ack = 0  # the relay keeps each signal until a later poll acknowledges it
        while True:
            try:
                body, _ = await relay.client.call("nat.poll", {"wait": POLL_WAIT, "epoch": self.epoch, "ack": ack},
                                                  timeout=POLL_WAIT + 2.0)
                reply = body_map(body)
                signals = need(reply, "signals", list, max_len=64)
                ack = max(ack, maybe(reply, "ack", int, ack))
            except EdgemeshError as exc:
                log.debug("polling %s: %s", relay.node_id, exc)
                await asyncio.sleep(0.5)
                continue
            for s in signals:
                self._spawn(self.on_signal(s, via=relay.node_id))

    async def on_signal(self, data: Any, via: str | None) -> None:
        try:
            s = decode_signal(data)
        except ProtocolError as exc:
            self.stats.bad_signals += 1
            log.debug("dropped a malformed signal: %s", exc)
            return
        if s.receiver != self.me:
            return
        if self.key_of(s.sender) is None and via is not None:
            await self.refresh_view(via)  # the sender may have joined a moment ago
        try:
            check_signal(self.cluster_id, s, self.me, self.key_of)
        except AuthError as exc:
            self.stats.refused_channels += 1
            log.warning("refused a signal: %s", exc)
            return
        if s.kind == "answer":
            out = self._outgoing.get((s.sender, s.relay))
            if out is not None and out.sid == s.sid and not out.answer.done():
                out.answer.set_result(s)
            return
        now = time.monotonic()
        if s.sid in self._seen_offers:
            return
        self._seen_offers = {k: t for k, t in self._seen_offers.items() if now - t < 60}
        self._seen_offers[s.sid] = now
        key = (s.sender, s.relay)
        mine = self._outgoing.get(key)
        if mine is not None:
            if self.me < s.sender and not mine.answer.done():
                return  # glare: our offer wins; the peer answers it
            if mine.task is not None:
                mine.task.cancel()
            self._outgoing.pop(key, None)
        previous = self._answering.get(key)
        if previous is not None:
            previous.cancel()
        self._answering[key] = self._spawn(self._answer(s))

    # ---- relay side (mesh RPC handlers) -------------------------------------------
    async def rpc_signal(self, call: Call) -> Any:
        body = body_map(call.body)
        to = need(body, "to", str, max_len=64)
        signal = need(body, "signal", bytes, max_len=16 * 1024)
        if to == self.me:
            self._spawn(self.on_signal(signal, via=self.node_of(call.peer_key)))
            return {"active": True}
        return {"active": self.mailbox.put(to, signal)}

    async def rpc_poll(self, call: Call) -> Any:
        node = self.node_of(call.peer_key)
        if node is None:
            raise ProtocolError("only members poll for signals")
        body = body_map(call.body)
        wait = min(max(maybe(body, "wait", float, 0.0), 0.0), 15.0)
        epoch = maybe(body, "epoch", bytes, b"")
        ack = maybe(body, "ack", int, 0)
        if self._poller_epochs.get(node) != epoch:
            # A (re)started member: if we cannot call it directly, set up a path now rather
            # than after our backoff or a dead channel's silence limit.
            self._poller_epochs[node] = epoch
            link = self.peers.get(node)
            if link is not None and not link.direct:
                self._want(node, force=True)
        signals, last = await self.mailbox.take(node, wait, ack)
        return {"signals": signals, "ack": last}

    # ---- bookkeeping ---------------------------------------------------------------
    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def channel_paths(self) -> dict[str, str]:
        return {peer: ch.path for peer, ch in self._channels.items()}

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        channels = list(self._channels.values())
        self._channels.clear()
        for ch in channels:
            try:
                await ch.close()
            except Exception as exc:  # noqa: BLE001
                log.debug("closing a channel: %s", exc)
