"""The replicated membership view: merge rules and the allow-list they produce.

Merging is commutative and idempotent (newest valid version per node wins), so members can
gossip their views in any order and converge. Entries whose admitter is not known yet are
held back and retried, because gossip can deliver a child before its admitter.

Removals (``mesh.revocation``) are merged the same way and always win: a removed node's record
is kept (its earlier admissions still need its key) but frozen, it is no member, its key is off
the allow-list, and a record it admitted in its removal epoch or later is dropped — also one
accepted before the removal arrived, so the order in which gossip delivers them does not matter.
"""

from __future__ import annotations

import logging
from typing import Iterable

from edgemesh.errors import AuthError, ProtocolError
from edgemesh.identity.keys import verify
from edgemesh.identity.statedir import ClusterInfo
from edgemesh.mesh.records import MemberRecord, admission_message, check_self
from edgemesh.mesh.revocation import Removal, check_removal

log = logging.getLogger(__name__)

MAX_PENDING = 256


class MembershipView:
    def __init__(self, cluster: ClusterInfo) -> None:
        self.cluster = cluster
        self.records: dict[str, MemberRecord] = {}
        self._pending: dict[str, MemberRecord] = {}
        self._by_curve: dict[bytes, str] = {}
        self.removals: dict[str, Removal] = {}  # removed node id -> its earliest removal (the cut-off)
        # Every signer's earliest removal of each node: all are gossiped, so every member ends
        # with the same set and the same epoch whichever of them it heard first.
        self._removals_by: dict[tuple[str, str], Removal] = {}
        self._pending_removals: dict[tuple[str, str], Removal] = {}
        self.epoch_floor = 0  # raised by secret rotations (the service tracks those)
        self.rejected = 0

    # ---- queries -------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The member epoch: the highest removal or rotation epoch seen."""
        return max([self.epoch_floor, *(r.epoch for r in self._removals_by.values())])

    def is_current(self, r: MemberRecord | None) -> bool:
        return r is not None and r.status == "member" and r.node_id not in self.removals

    def members(self) -> list[MemberRecord]:
        return [r for r in self.records.values() if self.is_current(r)]

    def is_member_curve_key(self, curve_key: bytes) -> bool:
        node_id = self._by_curve.get(curve_key)
        return node_id is not None and self.is_current(self.records.get(node_id))

    def removal(self, node_id: str) -> Removal | None:
        return self.removals.get(node_id)

    def node_for_curve_key(self, curve_key: bytes) -> MemberRecord | None:
        node_id = self._by_curve.get(curve_key)
        return self.records.get(node_id) if node_id else None

    def get(self, node_id: str) -> MemberRecord | None:
        return self.records.get(node_id)

    def to_wire(self) -> list[dict]:
        return [r.to_wire() for r in self.records.values()]

    def removals_wire(self) -> list[dict]:
        return [r.to_wire() for r in self._removals_by.values()]

    # ---- removals ------------------------------------------------------------
    def merge_removals_wire(self, items: Iterable[object]) -> list[Removal]:
        removals = []
        for item in items:
            try:
                removals.append(Removal.from_wire(item))
            except ProtocolError as exc:
                self.rejected += 1
                log.warning("ignored a malformed removal: %s", exc)
        return self.merge_removals(removals)

    def merge_removals(self, removals: Iterable[Removal]) -> list[Removal]:
        """Merge removals; those whose signer is not known yet wait (like records). Returns the
        removals that newly took effect (or moved a node's cut-off earlier)."""
        changed: list[Removal] = []
        queue = list(removals) + list(self._pending_removals.values())
        self._pending_removals.clear()
        for rm in queue:
            same = self._removals_by.get((rm.node_id, rm.by))
            if same is not None and same.order() <= rm.order():
                continue
            signer = self.records.get(rm.by)
            # Both ends must be known records: a removal of a node nobody has heard of waits
            # (bounded), so a member cannot grow every view with removals of made-up ids.
            if signer is None or rm.node_id not in self.records:
                if len(self._pending_removals) < MAX_PENDING:
                    self._pending_removals[(rm.node_id, rm.by)] = rm
                continue
            try:
                check_removal(self.cluster.cluster_id, rm, signer.key)
            except AuthError as exc:
                self.rejected += 1
                log.warning("refused a removal: %s", exc)
                continue
            self._removals_by[(rm.node_id, rm.by)] = rm
            current = self.removals.get(rm.node_id)
            if current is None or rm.order() < current.order():
                self.removals[rm.node_id] = rm
                changed.append(rm)
        if changed:
            self._drop_void_admissions()
        return changed

    def _admission_void(self, r: MemberRecord) -> bool:
        """Admitted by a removed node in (or after) the epoch it was removed in."""
        rm = self.removals.get(r.admitted_by)
        return r.admitted_by != r.node_id and rm is not None and r.admission_epoch >= rm.epoch

    def _drop_void_admissions(self) -> None:
        """Records admitted by a removed node after its removal, and what they admitted in turn."""
        dropped = True
        while dropped:
            dropped = False
            for r in list(self.records.values()):
                if r.node_id == self.cluster.root or r.node_id in self.removals:
                    continue
                if r.admitted_by not in self.records or self._admission_void(r):
                    log.warning("dropped member record %s: admitted by %s after it was removed", r.node_id, r.admitted_by)
                    del self.records[r.node_id]
                    self._by_curve.pop(r.curve_key, None)
                    dropped = True

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
        if current is not None and r.node_id in self.removals:
            # A tombstone wins over any later version of the node's own record.
            self.rejected += 1
            log.warning("refused member record %s: the node was removed from the cluster", r.node_id)
            return "bad"
        try:
            check_self(self.cluster.cluster_id, r)
            if current is not None and current.key == r.key and current.admission_sig == r.admission_sig:
                return "newer"  # admission already checked when we first stored it
            if r.node_id == self.cluster.root:
                if r.admitted_by != r.node_id:
                    raise AuthError("the root must admit itself")
                verify(r.key, admission_message(self.cluster.cluster_id, r.node_id, r.key, r.admission_epoch),
                       r.admission_sig)
                return "newer"
            if r.admitted_by == r.node_id:
                raise AuthError("only the cluster's root may admit itself")
            admitter = self.records.get(r.admitted_by)
            if admitter is None:
                return "held"
            if self._admission_void(r):
                raise AuthError(f"admitted by {r.admitted_by} in epoch {r.admission_epoch}, "
                                f"after it was removed (epoch {self.removals[r.admitted_by].epoch})")
            verify(admitter.key, admission_message(self.cluster.cluster_id, r.node_id, r.key, r.admission_epoch),
                   r.admission_sig)
            return "newer"
        except AuthError as exc:
            self.rejected += 1
            log.warning("refused member record %s: %s", r.node_id, exc)
            return "bad"

    def _store(self, r: MemberRecord) -> None:
        self.records[r.node_id] = r
        self._by_curve[r.curve_key] = r.node_id
