"""One ICE channel to one peer: aiortc's ICE, DTLS and SCTP transports, one data channel.

We use aiortc's ORTC objects (gatherer, ICE, DTLS, SCTP, negotiated data channel) instead of
RTCPeerConnection: no SDP to generate and parse, and the signalling is ours (signed, see
``binding``). DTLS gives encryption and checks the peer's certificate against the signed
fingerprint; SCTP gives reliable ordered delivery, fragmentation and congestion control, so
we only frame messages (``framing``). The measured cost is throughput (~10 MB/s here), which
is fine for the control plane and cross-NAT traffic this channel carries.

This module does no identity checks itself: ``traversal`` runs the hello over ``recv``/``send``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Any

from edgemesh.errors import ProtocolError
from edgemesh.nat.framing import CHUNK_BYTES, Reassembler, chunks
from edgemesh.nat.servers import IceServer
from edgemesh.nat.turn import TurnCredential

log = logging.getLogger(__name__)

SCTP_PORT = 5000
MAX_MESSAGE = 256 * 1024  # what both ends accept per SCTP message (aiortc's own limit)
HIGH_WATER = 4 * 1024 * 1024  # small messages: stop queueing into SCTP above this many unsent bytes
LOW_WATER = 1024 * 1024
# Messages longer than one chunk go on their own stream (1), fed to SCTP a few chunks at a time:
# aiortc keeps one FIFO of unsent messages for all streams, so a 10 MiB message queued at once
# held every ping, keep-alive and RPC behind it for seconds (peers looked dead during transfers,
# channels were closed as silent). Single-chunk messages (stream 0) now wait for at most the
# bulk window.
BULK_WINDOW = 4 * CHUNK_BYTES
BULK_LOW = 2 * CHUNK_BYTES
CONTROL_STREAM, BULK_STREAM = 0, 1


@dataclass(frozen=True)
class LocalOffer:
    ufrag: str
    pwd: str
    candidates: tuple[str, ...]
    fingerprints: tuple[tuple[str, str], ...]


def path_of(local_type: str, remote_type: str, local_host: str, remote_host: str) -> str:
    """The link table's name for a selected candidate pair. Host candidates in different subnets
    still count as punched: one of them may sit behind a NAT that the check went through."""
    if "relay" in (local_type, remote_type):
        return "relayed"
    if local_type == "host" and remote_type == "host":
        try:
            same = ipaddress.ip_network(f"{local_host}/24", strict=False) == ipaddress.ip_network(
                f"{remote_host}/24", strict=False)
        except ValueError:
            same = False
        if same:
            return "lan"
    return "punched"


class _FirstNomination(dict):  # type: ignore[type-arg]
    """aioice's map of selected pairs, frozen at the first nomination.

    With aggressive nomination every later successful check re-nominates, so a late check on a
    relay pair can move one side's traffic to a path the other side's NAT filters (seen behind
    symmetric NAT: the channel went silent seconds after it came up). Both sides keep the first
    pair they agreed on; anything better comes from a later session (see ``traversal``).
    """

    def __setitem__(self, key: object, value: object) -> None:
        if key not in self:
            super().__setitem__(key, value)


class IceChannel:
    """Gather, then connect; afterwards ``send`` whole messages and ``recv`` them in order."""

    def __init__(self, stun: IceServer | None, turn: IceServer | None, credential: TurnCredential | None,
                 use_relay: bool = True, relay_only: bool = False) -> None:
        from aiortc import RTCCertificate, RTCIceGatherer, RTCIceServer, RTCIceTransportPolicy

        servers = []
        if stun is not None:
            servers.append(RTCIceServer(urls=f"stun:{stun.host}:{stun.port}"))
        if turn is not None and use_relay and credential is not None:
            servers.append(RTCIceServer(urls=f"turn:{turn.host}:{turn.port}", username=credential.username,
                                        credential=credential.password))
        # A relayed session runs beside a punch attempt (see ``traversal``): relay candidates only,
        # so its path is the relay and its checks do not race the punch for the same pairs.
        policy = RTCIceTransportPolicy.RELAY if relay_only else RTCIceTransportPolicy.ALL
        self.gatherer = RTCIceGatherer(iceServers=servers, iceTransportPolicy=policy)
        self.cert = RTCCertificate.generateCertificate()
        self.path = "none"
        self._ice: Any = None
        self._dtls: Any = None
        self._sctp: Any = None
        self._dc: Any = None
        self._bulk: Any = None
        self._inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._reasm = {CONTROL_STREAM: Reassembler(), BULK_STREAM: Reassembler()}
        self._writable = asyncio.Event()
        self._writable.set()
        self._bulk_writable = asyncio.Event()
        self._bulk_writable.set()
        self._bulk_lock = asyncio.Lock()  # bulk messages go one after the other (chunks of one stream)
        self.closed = asyncio.Event()
        self.bytes_sent = 0
        self.heard = time.monotonic()  # last chunk received: a long message is alive while it arrives

    async def gather(self) -> LocalOffer:
        from aiortc.sdp import candidate_to_sdp

        await self.gatherer.gather()
        params = self.gatherer.getLocalParameters()
        cands = tuple(candidate_to_sdp(c) for c in self.gatherer.getLocalCandidates())
        fps = tuple((f.algorithm, f.value) for f in self.cert.getFingerprints())
        return LocalOffer(params.usernameFragment, params.password, cands, fps)

    async def connect(self, ufrag: str, pwd: str, candidates: tuple[str, ...],
                      fingerprints: tuple[tuple[str, str], ...], controlling: bool) -> None:
        """ICE checks, DTLS (peer certificate must match ``fingerprints``), SCTP, data channel.
        Raises ``ConnectionError`` when any step fails; the caller bounds it with a timeout."""
        await self.connect_ice(ufrag, pwd, candidates, controlling)
        await self.connect_dtls(fingerprints)

    async def connect_ice(self, ufrag: str, pwd: str, candidates: tuple[str, ...], controlling: bool) -> None:
        """The ICE checks alone: returns once a candidate pair is nominated."""
        from aiortc import RTCIceParameters, RTCIceTransport
        from aiortc.sdp import candidate_from_sdp

        self._ice = RTCIceTransport(self.gatherer)
        self._ice._connection.ice_controlling = controlling
        self._ice._connection._nominated = _FirstNomination()
        for c in candidates:
            try:
                cand = candidate_from_sdp(c)
            except (ValueError, IndexError) as exc:
                raise ProtocolError(f"bad ICE candidate: {exc}") from None
            cand.sdpMid = "0"
            await self._ice.addRemoteCandidate(cand)
        await self._ice.addRemoteCandidate(None)
        await self._ice.start(RTCIceParameters(usernameFragment=ufrag, password=pwd))
        if self._ice.state != "completed":
            raise ConnectionError("ICE found no working candidate pair")
        self.path = self._selected_path()

    async def connect_dtls(self, fingerprints: tuple[tuple[str, str], ...]) -> None:
        """DTLS over the nominated pair, then SCTP and the data channel."""
        from aiortc import (RTCDataChannel, RTCDataChannelParameters, RTCDtlsFingerprint, RTCDtlsParameters,
                            RTCDtlsTransport, RTCSctpCapabilities, RTCSctpTransport)

        self._dtls = RTCDtlsTransport(self._ice, [self.cert])
        await self._dtls.start(RTCDtlsParameters(
            fingerprints=[RTCDtlsFingerprint(algorithm=a, value=v) for a, v in fingerprints]))
        if self._dtls.state != "connected":
            raise ConnectionError("DTLS handshake failed (or the peer's certificate is not the signed one)")
        self._sctp = RTCSctpTransport(self._dtls, port=SCTP_PORT)
        opened = asyncio.Event()
        self._dc = RTCDataChannel(self._sctp, RTCDataChannelParameters(label="edgemesh", negotiated=True,
                                                                       id=CONTROL_STREAM))
        self._dc.bufferedAmountLowThreshold = LOW_WATER
        self._dc.on("open", opened.set)
        self._dc.on("message", lambda data: self._on_chunk(CONTROL_STREAM, data))
        self._dc.on("close", self._on_close)
        self._dc.on("bufferedamountlow", self._writable.set)
        self._bulk = RTCDataChannel(self._sctp, RTCDataChannelParameters(label="edgemesh-bulk", negotiated=True,
                                                                         id=BULK_STREAM))
        self._bulk.bufferedAmountLowThreshold = BULK_LOW
        self._bulk.on("message", lambda data: self._on_chunk(BULK_STREAM, data))
        self._bulk.on("close", self._on_close)
        self._bulk.on("bufferedamountlow", self._bulk_writable.set)
        self._ice.on("statechange", self._on_ice_state)
        self._dtls.on("statechange", self._on_ice_state)
        await self._sctp.start(RTCSctpCapabilities(maxMessageSize=MAX_MESSAGE), SCTP_PORT)
        await opened.wait()

    def _selected_path(self) -> str:
        conn = self._ice._connection
        pair = next(iter(conn._nominated.values()), None)
        if pair is None:
            return "punched"
        loc, rem = pair.local_candidate, pair.remote_candidate
        return path_of(loc.type, rem.type, loc.host, rem.host)

    def _on_ice_state(self) -> None:
        if self._ice is not None and self._ice.state in ("failed", "closed"):
            self._on_close()
        if self._dtls is not None and self._dtls.state in ("failed", "closed"):
            self._on_close()

    def _on_chunk(self, stream: int, data: Any) -> None:
        if self.closed.is_set():
            return
        self.heard = time.monotonic()
        try:
            msg = self._reasm[stream].feed(data if isinstance(data, bytes) else b"")
        except ProtocolError as exc:
            log.warning("closing an ICE channel that sent a malformed chunk: %s", exc)
            self._on_close()
            return
        if msg is not None:
            self._inbox.put_nowait(msg)

    def _on_close(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            self._inbox.put_nowait(None)

    def diagnosis(self) -> str:
        """SCTP's view of a silent channel, for the log."""
        sctp = self._sctp
        if sctp is None:
            return "no association"
        return (f"association {sctp._association_state.name}, ICE {getattr(self._ice, 'state', '?')}, "
                f"{len(sctp._sent_queue)} chunks unacked, {len(sctp._outbound_queue)} queued, "
                f"cwnd {sctp._cwnd}, rto {sctp._rto:.1f} s")

    def dead(self) -> bool:
        """The peer ended the association (or DTLS) without a close event reaching us."""
        if self._sctp is not None and self._sctp._association_state == self._sctp.State.CLOSED:
            return True
        return self._dtls is not None and self._dtls.state in ("closed", "failed")

    async def recv(self) -> bytes | None:
        """The next whole message, or None once the channel is closed."""
        if self.closed.is_set() and self._inbox.empty():
            return None
        return await self._inbox.get()

    async def send(self, message: bytes) -> None:
        """Queue one message. A single-chunk message goes out at once (waits only while more than
        ``HIGH_WATER`` bytes of them are unsent); a longer one is fed to the bulk stream a window
        at a time, so small messages overtake it."""
        if self.closed.is_set() or self._dc is None:
            raise ConnectionError("the ICE channel is closed")
        parts = chunks(message, CHUNK_BYTES)
        if len(parts) == 1:
            await self._wait_below(self._dc, HIGH_WATER, self._writable)
            self._dc.send(parts[0])
        else:
            async with self._bulk_lock:
                for part in parts:
                    await self._wait_below(self._bulk, BULK_WINDOW, self._bulk_writable)
                    self._bulk.send(part)
        self.bytes_sent += len(message)

    async def _wait_below(self, dc: Any, limit: int, writable: asyncio.Event) -> None:
        while dc.bufferedAmount > limit:
            writable.clear()
            waiter = asyncio.ensure_future(writable.wait())
            closer = asyncio.ensure_future(self.closed.wait())
            try:
                await asyncio.wait({waiter, closer}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                closer.cancel()
            if self.closed.is_set():
                raise ConnectionError("the ICE channel closed while sending")

    async def close(self) -> None:
        self._on_close()
        for part in (self._sctp, self._dtls, self._ice):
            if part is None:
                continue
            try:
                await asyncio.wait_for(part.stop(), 2.0)
            except Exception as exc:  # noqa: BLE001 — closing must not fail the caller
                log.debug("closing %s: %s", type(part).__name__, exc)
        if self._ice is None:
            try:
                await asyncio.wait_for(self.gatherer._connection.close(), 2.0)
            except Exception as exc:  # noqa: BLE001
                log.debug("closing an unused gatherer: %s", exc)
