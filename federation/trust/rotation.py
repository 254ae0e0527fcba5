"""Root rotation as data, pure: the state a root directory keeps and the phase it is in.

Rotation without downtime goes through these phases, each entered by one idempotent command::

    stable ──add-root──> root-added ──reissue──> reissuing ──(all clusters)──> leaves-rolling
       ^                 (bundle = old+new;       (new root signs;               (every intermediate is under
       |                  distribute it)           intermediates re-issued)       the new root; old leaves
       |                                                                          still valid until T)
       |                                                                              │ time passes (T)
       └──────────────────────────retire-root─────────────── ready-to-retire <────────┘
                                  (bundle = new only)

``T`` is the last re-issue time plus the longest leaf lifetime the CAs may sign (``max_leaf_ttl``); after it no
leaf issued under an old intermediate can still be valid, so removing the old root breaks nobody.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from federation.trust.errors import CAStoreError
from federation.trust.spiffe import TrustDomain

STATE_VERSION = 1


class Phase(enum.StrEnum):
    STABLE = "stable"
    ROOT_ADDED = "root-added"
    REISSUING = "reissuing"
    LEAVES_ROLLING = "leaves-rolling"
    READY_TO_RETIRE = "ready-to-retire"


NEXT_STEP = {
    Phase.STABLE: "nothing to do (start a rotation with `meshfed ca rotate add-root`)",
    Phase.ROOT_ADDED: "`meshfed ca rotate reissue` (it waits until every cluster trusts the new root)",
    Phase.REISSUING: "`meshfed ca rotate reissue` for the remaining clusters",
    Phase.LEAVES_ROLLING: ("`meshfed ca rotate retire-root` once nothing uses the old root (it asks the running "
                           "system), or after the old leaves have expired"),
    Phase.READY_TO_RETIRE: "`meshfed ca rotate retire-root`",
}


@dataclass(frozen=True)
class IntermediateRecord:
    """The latest intermediate the root directory issued for one authority, and where it was written."""

    authority: str
    fingerprint: str
    root_fingerprint: str
    issued_at: datetime
    not_after: datetime
    dir: str


@dataclass(frozen=True)
class RootState:
    trust_domain: TrustDomain
    active: str  # fingerprint of the root that signs new intermediates
    trusted: tuple[str, ...]  # fingerprints in the bundle, oldest first
    sequence: int  # bundle sequence, bumped on every change of ``trusted``
    max_leaf_ttl: timedelta
    intermediates: tuple[IntermediateRecord, ...] = ()
    retired: tuple[str, ...] = ()

    @property
    def old_root(self) -> str | None:
        """During a rotation, the root being replaced."""
        others = [fp for fp in self.trusted if fp != self.active]
        if len(self.trusted) == 2 and self.active == self.trusted[0]:
            return None  # root-added: the active one is still the old one
        return others[0] if others else None

    @property
    def next_root(self) -> str | None:
        """In ``root-added``: the new root, trusted but not yet signing."""
        if len(self.trusted) == 2 and self.active == self.trusted[0]:
            return self.trusted[1]
        return None

    def under(self, root_fp: str) -> list[IntermediateRecord]:
        return [r for r in self.intermediates if r.root_fingerprint == root_fp]

    def old_leaves_valid_until(self) -> datetime | None:
        """After a re-issue: the moment after which no leaf under an old intermediate can still be valid."""
        if len(self.trusted) < 2 or self.next_root is not None:
            return None
        moved = [r.issued_at for r in self.under(self.active)]
        return (max(moved) + self.max_leaf_ttl) if moved else None

    def phase(self, now: datetime) -> Phase:
        if len(self.trusted) == 1:
            return Phase.STABLE
        if self.next_root is not None:
            return Phase.ROOT_ADDED
        old = self.old_root
        if old is not None and self.under(old):
            return Phase.REISSUING
        until = self.old_leaves_valid_until()
        if until is not None and now < until:
            return Phase.LEAVES_ROLLING
        return Phase.READY_TO_RETIRE

    def with_intermediate(self, rec: IntermediateRecord) -> RootState:
        keep = tuple(r for r in self.intermediates if r.authority != rec.authority)
        return replace(self, intermediates=(*keep, rec))

    # -- JSON ---------------------------------------------------------------------------------------------------------
    def to_json(self) -> bytes:
        doc = {
            "version": STATE_VERSION,
            "trust_domain": self.trust_domain.name,
            "active": self.active,
            "trusted": list(self.trusted),
            "sequence": self.sequence,
            "max_leaf_ttl_seconds": int(self.max_leaf_ttl.total_seconds()),
            "retired": list(self.retired),
            "intermediates": [
                {
                    "authority": r.authority,
                    "fingerprint": r.fingerprint,
                    "root_fingerprint": r.root_fingerprint,
                    "issued_at": r.issued_at.isoformat(),
                    "not_after": r.not_after.isoformat(),
                    "dir": r.dir,
                }
                for r in self.intermediates
            ],
        }
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, *, what: str) -> RootState:
        try:
            doc = json.loads(data)
            if not isinstance(doc, Mapping) or doc.get("version") != STATE_VERSION:
                raise ValueError(f"unknown state version {doc.get('version') if isinstance(doc, Mapping) else doc!r}")
            recs = tuple(_record(r) for r in doc.get("intermediates", []))
            state = cls(
                trust_domain=TrustDomain(str(doc["trust_domain"])),
                active=str(doc["active"]),
                trusted=tuple(str(x) for x in doc["trusted"]),
                sequence=int(doc["sequence"]),
                max_leaf_ttl=timedelta(seconds=int(doc["max_leaf_ttl_seconds"])),
                intermediates=recs,
                retired=tuple(str(x) for x in doc.get("retired", [])),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise CAStoreError(f"{what}: not a valid meshfed root state: {exc}") from exc
        if state.active not in state.trusted or not 1 <= len(state.trusted) <= 2:
            raise CAStoreError(f"{what}: active root must be one of the 1 or 2 trusted roots")
        return state


def _record(r: Any) -> IntermediateRecord:
    return IntermediateRecord(
        authority=str(r["authority"]),
        fingerprint=str(r["fingerprint"]),
        root_fingerprint=str(r["root_fingerprint"]),
        issued_at=datetime.fromisoformat(r["issued_at"]),
        not_after=datetime.fromisoformat(r["not_after"]),
        dir=str(r["dir"]),
    )
