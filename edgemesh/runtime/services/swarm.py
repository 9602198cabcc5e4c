"""The daemon's swarm service: members answer and judge over the mesh, one member coordinates.

Member side (any member whose node has a swarm backend configured, `edgemesh swarm config`):
``swarm.commit`` answers a question with the node's backend and returns only the commitment (hash
of answer + nonce); ``swarm.reveal`` returns the answer and nonce once every commitment is in;
``swarm.judge`` compares two answers. These are ordinary mesh RPCs, so they travel over whatever
path the pair has — LAN, direct, punched or relayed — and only members can call them.

Coordinator side (``admin.swarm_ask``, from this node's own CLI): runs one round
(``edgemesh.swarm.round.run_round``) over itself and every alive member, with the reputation book
kept in the state dir (``swarm-reputation.json``) so it survives restarts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from dataclasses import dataclass
from typing import Any, Callable

from edgemesh.errors import ConfigError, EdgemeshError, ProtocolError
from edgemesh.identity.statedir import StateDir
from edgemesh.rpc.dispatch import Call, Handler
from edgemesh.runtime.services import Task
from edgemesh.swarm.reputation import ReputationBook
from edgemesh.swarm.round import LocalPeer, Query, Reveal, RoundConfig, run_round
from edgemesh.wire.schema import body_map, maybe, need

log = logging.getLogger(__name__)

MAX_QUESTION = 8_000
MAX_ANSWER = 16_000
BOOK_FILE = "swarm-reputation.json"


@dataclass
class RemotePeer:
    """A member's node, reached through the mesh (its ``SwarmPeer`` over RPC)."""

    id: str
    call: Callable[..., Any]  # async (method, body, timeout) -> reply body

    async def commit(self, query: Query) -> str:
        reply = await self.call("swarm.commit", query._asdict(), 600.0)
        return need(body_map(reply), "commitment", str, max_len=64)

    async def reveal(self, query_id: str) -> Reveal:
        reply = body_map(await self.call("swarm.reveal", {"query_id": query_id}, 30.0))
        return Reveal(need(reply, "answer", str, max_len=MAX_ANSWER), need(reply, "nonce", str, max_len=128))

    async def judge(self, query: Query, answer_a: str, answer_b: str) -> str:
        reply = await self.call("swarm.judge", {**query._asdict(), "a": answer_a, "b": answer_b}, 300.0)
        return need(body_map(reply), "verdict", str, max_len=2000)


class SwarmService:
    name = "swarm"

    def __init__(self, state: StateDir, node_id: str, members: Callable[[], list[str]],
                 caller: Callable[[str], Callable[..., Any] | None]) -> None:
        """``members()``: ids of the alive members other than this node; ``caller(node)``: an
        async (method, body, timeout) function for that node, or None when it has no link."""
        self.state = state
        self.node_id = node_id
        self.members = members
        self.caller = caller
        self._peer: LocalPeer | None = None
        self._backend_key: str | None = None
        self._lock = asyncio.Lock()

    def handlers(self) -> dict[str, Handler]:
        return {"swarm.commit": self._rpc_commit, "swarm.reveal": self._rpc_reveal,
                "swarm.judge": self._rpc_judge, "admin.swarm_ask": self._rpc_ask}

    def tasks(self) -> list[Task]:
        return []

    async def close(self) -> None:
        pass

    # ---- member side ---------------------------------------------------------------
    def local_peer(self) -> LocalPeer:
        """This node's member, built from the settings saved by `edgemesh swarm config` (read
        again when they change, so no restart is needed)."""
        conf = self.state.load_settings().get("swarm")
        if not isinstance(conf, dict):
            raise EdgemeshError("this node has no swarm backend; set one with `edgemesh swarm config`", "no_backend")
        key = json.dumps(conf, sort_keys=True)
        if self._peer is None or key != self._backend_key:
            from edgemesh.runtime.swarm_openai import OpenAIBackendConfig, OpenAIMember

            member = OpenAIMember(self.node_id, OpenAIBackendConfig.from_mapping(conf, "swarm settings"))
            self._peer, self._backend_key = LocalPeer(member), key
        return self._peer

    async def _rpc_commit(self, call: Call) -> Any:
        body = body_map(call.body)
        query = Query(need(body, "query_id", str, max_len=64), need(body, "question", str, max_len=MAX_QUESTION))
        return {"commitment": await self.local_peer().commit(query)}

    async def _rpc_reveal(self, call: Call) -> Any:
        query_id = need(body_map(call.body), "query_id", str, max_len=64)
        try:
            reveal = await self.local_peer().reveal(query_id)
        except LookupError as exc:
            raise ProtocolError(str(exc)) from None
        return reveal._asdict()

    async def _rpc_judge(self, call: Call) -> Any:
        body = body_map(call.body)
        query = Query(need(body, "query_id", str, max_len=64), need(body, "question", str, max_len=MAX_QUESTION))
        verdict = await self.local_peer().judge(query, need(body, "a", str, max_len=MAX_ANSWER),
                                                need(body, "b", str, max_len=MAX_ANSWER))
        return {"verdict": verdict}

    # ---- coordinator side ----------------------------------------------------------
    async def _rpc_ask(self, call: Call) -> Any:
        body = body_map(call.body)
        question = need(body, "question", str, max_len=MAX_QUESTION)
        if not question.strip():
            raise ConfigError("the question is empty")
        timeout = float(maybe(body, "timeout", float, 120.0))
        async with self._lock:  # one round at a time: the reputation book is shared
            return await self.ask(question, timeout)

    async def ask(self, question: str, timeout: float = 120.0) -> dict[str, Any]:
        peers: list[Any] = []
        try:
            peers.append(self.local_peer())
        except EdgemeshError as exc:
            log.info("this node does not answer itself: %s", exc)
        for node in self.members():
            call = self.caller(node)
            if call is not None:
                peers.append(RemotePeer(node, call))
        if len(peers) < 2:
            raise EdgemeshError("a swarm round needs at least two members with a swarm backend "
                                "(`edgemesh swarm config` on each)")
        book = self._load_book()
        config = RoundConfig(commit_timeout=timeout, judge_timeout=timeout, reveal_timeout=min(timeout, 30.0))
        result = await run_round(Query(secrets.token_hex(8), question), peers, book, config)
        self._save_book(book)
        if not result.answers:
            raise EdgemeshError("no member answered: " + "; ".join(
                f"{who[:12]}: {why}" for who, why in sorted(result.left_out.items())))
        return result.to_dict()

    def _load_book(self) -> ReputationBook:
        path = self.state.file(BOOK_FILE)
        try:
            return ReputationBook.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            return ReputationBook()
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("swarm reputation file unreadable (%s): starting afresh", exc)
            return ReputationBook()

    def _save_book(self, book: ReputationBook) -> None:
        path = self.state.file(BOOK_FILE)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(book.to_dict()))
        tmp.replace(path)
