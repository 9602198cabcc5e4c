"""The joining side of admission: find a member, check its proof, register, check the view.

Whom to trust: the token's keys. A token point names the member's key, so the link to it is
authenticated by CURVE; a member found by mDNS names its own key, so anyone on the LAN can
pose as one. Either way the joiner believes a member only after (1) its proof of the token's
join secret verifies *for this link* (both CURVE keys and the cluster id are in it, so an answer
relayed from a real member does not verify), (2) its register reply is signed by the node key
the joiner dialled, (3) the cluster secret in that reply is the one the token's join secret was
derived from, and (4) the view it hands over verifies record by record under its root, holds the
member itself, this node's fresh admission by that member, and at least one of the token's keys.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from edgemesh.errors import AuthError, ProtocolError, RpcError, TokenError
from edgemesh.identity.keys import NodeKey, curve_public_for, node_id_for
from edgemesh.identity.statedir import ClusterInfo
from edgemesh.identity.token import JoinPoint, JoinToken, token_secret
from edgemesh.mesh.join import NONCE_BYTES, pack_record
from edgemesh.mesh.join_proof import JoinChannel, JoinReply, check_reply, client_mac, server_proof
from edgemesh.mesh.records import MemberRecord, sign_self
from edgemesh.mesh.rpc import RpcClient, rpc_session
from edgemesh.mesh.view import MembershipView
from edgemesh.transport.zmq_link import ZmqTransport
from edgemesh.wire.schema import body_map, need

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JoinResult:
    cluster: ClusterInfo
    records: list[Any]
    via: str
    removals: list[Any] = field(default_factory=list)


async def join_cluster(
    key: NodeKey,
    name: str,
    token: JoinToken,
    addresses: tuple[str, ...],
    join_addresses: tuple[str, ...],
    timeout: float = 3.0,
    discover: bool = True,
) -> JoinResult:
    """Try the token's join points in order, then members found on the LAN."""
    record = sign_self(token.cluster_id, key, MemberRecord(
        node_id=key.node_id, name=name, key=key.sign_public, version=int(time.time() * 1000),
        status="member", addresses=addresses, join=join_addresses))
    transport = ZmqTransport(key)
    failures: list[str] = []
    try:
        for point in token.points:
            result = await _try_point(transport, key, token, record, point, timeout, failures, trusted=True)
            if result:
                return result
        if discover:
            for point in await _discovered_points(token.cluster_id):
                if point in token.points:
                    continue
                result = await _try_point(transport, key, token, record, point, timeout, failures, trusted=False)
                if result:
                    return result
    finally:
        transport.close()
    raise TokenError(
        "could not reach any member of the cluster ("
        + "; ".join(failures)
        + "). Is a member running? Get a fresh token with `edgemesh token` on a running member."
    )


async def _try_point(
    transport: ZmqTransport, key: NodeKey, token: JoinToken, record: MemberRecord,
    point: JoinPoint, timeout: float, failures: list[str], trusted: bool,
) -> JoinResult | None:
    """One join attempt. A token point that refuses us means a wrong token (raise); a member
    found on the LAN that fails a check may be an impostor: note it and try the next one."""
    try:
        async with rpc_session(transport, point.endpoint, curve_public_for(point.sign_public),
                               bytes.fromhex(key.node_id)) as client:
            return await _handshake(client, key, token, record, point, timeout)
    except RpcError as exc:
        if exc.code in ("AuthError", "TokenError"):
            if trusted:
                raise AuthError(str(exc)) from None
            failures.append(f"{point.endpoint} (found on the LAN) refused us: {exc}")
            return None
        failures.append(f"{point.endpoint}: {exc}")
        return None
    except AuthError as exc:
        if trusted:
            raise
        log.warning("ignored %s, found on the LAN: %s", point.endpoint, exc)
        failures.append(f"{point.endpoint} (found on the LAN) failed authentication: {exc}")
        return None
    except ProtocolError as exc:
        failures.append(f"{point.endpoint}: bad answer ({exc})")
        return None


async def _handshake(client: RpcClient, key: NodeKey, token: JoinToken, record: MemberRecord,
                     point: JoinPoint, timeout: float) -> JoinResult:
    cnonce = secrets.token_bytes(NONCE_BYTES)
    body, _ = await client.call("join.challenge", {"cnonce": cnonce, "exp": token.expires}, timeout=timeout)
    body = body_map(body)
    nonce = need(body, "nonce", bytes, max_len=NONCE_BYTES)
    if need(body, "cluster", str) != token.cluster_id:
        raise TokenError(f"{point.endpoint} belongs to another cluster; the token does not match it")
    # The server's key as we dialled it, ours as its link saw it: a relayed answer does not match.
    channel = JoinChannel(token.cluster_id, curve_public_for(point.sign_public), key.curve_public, cnonce, nonce)
    if not hmac.compare_digest(need(body, "proof", bytes), server_proof(token.secret, channel)):
        raise AuthError(f"{point.endpoint} cannot prove it knows the cluster secret on this link: the token "
                        "is wrong for this cluster, was made before the cluster secret was rotated (get a new "
                        "one with `edgemesh token`), or it passes on another member's answers (an impostor?)")
    packed = pack_record(record)
    mac = client_mac(token.secret, channel, packed)
    reply, _ = await client.call("join.register", {"nonce": nonce, "record": packed, "mac": mac}, timeout=timeout)
    reply = body_map(reply)
    answer = JoinReply.from_wire(reply)
    check_reply(point.sign_public, channel, answer, need(reply, "sig", bytes, max_len=64))
    # The token holds only a join secret; the cluster secret comes once we are admitted. Our
    # token's join secret derives from it, so a member cannot hand us some other secret.
    if not hmac.compare_digest(token_secret(answer.secret, token.cluster_id, token.expires), token.secret):
        raise AuthError(f"{point.endpoint} sent a cluster secret that is not the one the token was made from")
    adopted = verified_view(token, point, record, answer.root, answer.records)
    cluster = ClusterInfo(token.cluster_id, answer.root, answer.secret, answer.secret_epoch,
                          answer.rotated_by, answer.rotation_sig)
    log.info("joined cluster %s via %s", token.cluster_id, point.endpoint)
    return JoinResult(cluster, adopted, point.endpoint, answer.removals)


def verified_view(token: JoinToken, point: JoinPoint, me: MemberRecord, root: str, records: list[Any]) -> list[Any]:
    """The records a joiner adopts, or ``AuthError``: each one verifies (self-signed by its owner,
    admitted along a chain that starts at ``root``), the member that answered is in it under
    the key we dialled, so is our own record admitted by that member, and so is at least one
    key from the token (the token's keys are the anchors that tie the view to the cluster)."""
    where = point.endpoint
    view = MembershipView(ClusterInfo(token.cluster_id, root, token.secret))
    view.merge_wire(records)
    if view.rejected or len(view.records) != len(records):
        raise AuthError(f"{where} sent a view with records that do not verify under its root (forged or damaged)")
    server = view.get(node_id_for(point.sign_public))
    if server is None or server.key != point.sign_public or server.status != "member":
        raise AuthError(f"{where} sent a view that does not hold itself as a member")
    mine = view.get(me.node_id)
    if mine is None or mine.key != me.key or mine.sig != me.sig or mine.admitted_by != server.node_id:
        raise AuthError(f"{where} sent a view without this node's admission")
    anchors = {p.sign_public for p in token.points}
    if not any(r.key in anchors for r in view.records.values()):
        raise AuthError(f"{where} sent a view that holds none of the token's members: "
                        "it is not the cluster the token names")
    return view.to_wire()


async def _discovered_points(cluster_id: str) -> list[JoinPoint]:
    try:
        from edgemesh.mesh.discovery import browse

        found = await browse(2.0)
    except Exception as exc:  # noqa: BLE001 — discovery is a fallback only
        log.info("LAN discovery unavailable: %s", exc)
        return []
    return [JoinPoint(a.join_endpoint, a.key) for a in found if a.cluster_id == cluster_id]
