"""The joining side of admission: find a member, check its proof, register, get the view."""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from edgemesh.errors import AuthError, ProtocolError, RpcError, TokenError
from edgemesh.identity.keys import NodeKey, curve_public_for
from edgemesh.identity.statedir import ClusterInfo
from edgemesh.identity.token import SECRET_BYTES, JoinPoint, JoinToken
from edgemesh.mesh.join import NONCE_BYTES, client_mac, pack_record, server_proof
from edgemesh.mesh.records import MemberRecord, sign_self
from edgemesh.mesh.rpc import RpcClient, rpc_session
from edgemesh.transport.zmq_link import ZmqTransport
from edgemesh.wire.schema import body_map, maybe, need

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
            result = await _try_point(transport, key, token, record, point, timeout, failures)
            if result:
                return result
        if discover:
            for point in await _discovered_points(token.cluster_id):
                if point in token.points:
                    continue
                result = await _try_point(transport, key, token, record, point, timeout, failures)
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
    point: JoinPoint, timeout: float, failures: list[str],
) -> JoinResult | None:
    try:
        async with rpc_session(transport, point.endpoint, curve_public_for(point.sign_public),
                               bytes.fromhex(key.node_id)) as client:
            return await _handshake(client, key, token, record, point, timeout)
    except RpcError as exc:
        if exc.code in ("AuthError", "TokenError"):
            raise AuthError(str(exc)) from None
        failures.append(f"{point.endpoint}: {exc}")
        return None
    except ProtocolError as exc:
        failures.append(f"{point.endpoint}: bad answer ({exc})")
        return None


async def _handshake(client: RpcClient, key: NodeKey, token: JoinToken, record: MemberRecord,
                     point: JoinPoint, timeout: float) -> JoinResult:
    cnonce = secrets.token_bytes(NONCE_BYTES)
    body, _ = await client.call("join.challenge", {"cnonce": cnonce, "exp": token.expires}, timeout=timeout)
    body = body_map(body)
    nonce = need(body, "nonce", bytes)
    if need(body, "cluster", str) != token.cluster_id:
        raise TokenError(f"{point.endpoint} belongs to another cluster; the token does not match it")
    if not hmac.compare_digest(need(body, "proof", bytes), server_proof(token.secret, cnonce, nonce)):
        raise AuthError(f"{point.endpoint} cannot prove it knows the cluster secret: the token is wrong "
                        "for this cluster, was made before the cluster secret was rotated (get a new one with "
                        "`edgemesh token`), or this is not the cluster you think")
    packed = pack_record(record)
    mac = client_mac(token.secret, token.cluster_id, nonce, packed)
    reply, _ = await client.call("join.register", {"nonce": nonce, "record": packed, "mac": mac}, timeout=timeout)
    reply = body_map(reply)
    records = need(reply, "records", list)
    root = need(reply, "root", str)
    # The token holds only a join secret; the cluster secret comes once we are admitted.
    secret = need(reply, "secret", bytes)
    if len(secret) != SECRET_BYTES:
        raise ProtocolError("the cluster secret in the reply has the wrong length")
    cluster = ClusterInfo(token.cluster_id, root, secret, maybe(reply, "secret_epoch", int, 0),
                          maybe(reply, "rotated_by", str, ""), maybe(reply, "rotation_sig", bytes, b""))
    log.info("joined cluster %s via %s", token.cluster_id, point.endpoint)
    return JoinResult(cluster, records, point.endpoint, maybe(reply, "removals", list, []))


async def _discovered_points(cluster_id: str) -> list[JoinPoint]:
    try:
        from edgemesh.mesh.discovery import browse

        found = await browse(2.0)
    except Exception as exc:  # noqa: BLE001 — discovery is a fallback only
        log.info("LAN discovery unavailable: %s", exc)
        return []
    return [JoinPoint(a.join_endpoint, a.key) for a in found if a.cluster_id == cluster_id]
