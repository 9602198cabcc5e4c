"""The replicated membership view: merge rules and the allow-list they produce.

Merging is commutative and idempotent (newest valid version per node wins), so members can
gossip their views in any order and converge. Entries whose admitter is not known yet are
held back and retried, because gossip can deliver a child before its admitter.
"""

from __future__ import annotations

import logging
from typing import Iterable

from edgemesh.errors import AuthError, ProtocolError
from edgemesh.identity.keys import verify
from edgemesh.identity.statedir import ClusterInfo
from edgemesh.mesh.records import MemberRecord, admission_message, check_self

log = logging.getLogger(__name__)

MAX_PENDING = 256


class MembershipView:
    def __init__(self, cluster: ClusterInfo) -> None:
        self.cluster = cluster
        self.records: dict[str, MemberRecord] = {}
        self._pending: dict[str, MemberRecord] = {}
        self._by_curve: dict[bytes, str] = {}
        self.rejected = 0

    # ---- queries -------------------------------------------------------------
    def members(self) -> list[MemberRecord]:
        return [r for r in self.records.values() if r.status == "member"]

    def is_member_curve_key(self, curve_key: bytes) -> bool:
        node_id = self._by_curve.get(curve_key)
        return node_id is not None and self.records[node_id].status == "member"

    def node_for_curve_key(self, curve_key: bytes) -> MemberRecord | None:
        node_id = self._by_curve.get(curve_key)
        return self.records.get(node_id) if node_id else None

    def get(self, node_id: str) -> MemberRecord | None:
        return self.records.get(node_id)

    def to_wire(self) -> list[dict]:
        return [r.to_wire() for r in self.records.values()]

    # ---- merging -------------------------------------------------------------
    def merge_wire(self, items: Iterable[object]) -> list[MemberRecord]:
        """Merge untrusted records; invalid ones are counted and skipped. Returns what changed."""
        records = []
        for item in items:
            try:
                records.append(MemberRecord.from_wire(item))
            except ProtocolError as exc:
                self.rejected += 1
                log.warning("ignored a malformed member record: %s", exc)
        return self.merge(records)

    def merge(self, records: Iterable[MemberRecord]) -> list[MemberRecord]:
        changed: list[MemberRecord] = []
        queue = list(records) + list(self._pending.values())
        self._pending.clear()
        progress = True
        while queue and progress:
            progress = False
            held = []
            for r in queue:
                verdict = self._accepts(r)
                if verdict == "held":
                    held.append(r)
                elif verdict == "newer":
                    self._store(r)
                    changed.append(r)
                    progress = True
            queue = held
        for r in queue[:MAX_PENDING]:
            self._pending[r.node_id] = r
        return changed

    def _accepts(self, r: MemberRecord) -> str:
        current = self.records.get(r.node_id)
        if current is not None and r.version <= current.version:
            return "old"
        try:
            check_self(self.cluster.cluster_id, r)
            if current is not None and current.key == r.key and current.admission_sig == r.admission_sig:
                return "newer"  # admission already checked when we first stored it
            if r.node_id == self.cluster.root:
                if r.admitted_by != r.node_id:
                    raise AuthError("the root must admit itself")
                verify(r.key, admission_message(self.cluster.cluster_id, r.node_id, r.key), r.admission_sig)
                return "newer"
            if r.admitted_by == r.node_id:
                raise AuthError("only the cluster's root may admit itself")
            admitter = self.records.get(r.admitted_by)
            if admitter is None:
                return "held"
            verify(admitter.key, admission_message(self.cluster.cluster_id, r.node_id, r.key), r.admission_sig)
            return "newer"
        except AuthError as exc:
            self.rejected += 1
            log.warning("refused member record %s: %s", r.node_id, exc)
            return "bad"

    def _store(self, r: MemberRecord) -> None:
        self.records[r.node_id] = r
        self._by_curve[r.curve_key] = r.node_id
