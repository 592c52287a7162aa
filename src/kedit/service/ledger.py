"""The edit ledger: entry states, their allowed transitions, and the audit log of every change.

States (:data:`kedit.service.models.STATES`)::

    pending --> applied --> committed --> rolled_back
       \\           \\
        +--> failed  +--> failed

``pending``: accepted, queued for the writer. ``applied``: the delta is in the served model and its artefact is on
disk, the KG is not yet changed. ``committed``: the KG change and the state are written in one transaction -- the
entry survives a restart (it is replayed). ``failed``: the edit was refused (policy), its compute failed, or the
server stopped before the commit. ``rolled_back``: undone in the model and the KG.
"""

from __future__ import annotations

from datetime import timezone
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from kedit.service.models import AuditEvent, Entry, ServiceState, utcnow

__all__ = ["TRANSITIONS", "LedgerError", "audit", "entry_dict", "get_state", "iso", "next_seq", "set_state", "transition"]

TRANSITIONS: dict[str, tuple[str, ...]] = {
    "pending": ("applied", "failed"),
    "applied": ("committed", "failed"),
    "committed": ("rolled_back",),
    "failed": (),
    "rolled_back": (),
}


class LedgerError(ValueError):
    """A transition the ledger does not allow."""


def audit(session: Session, action: str, *, user_id: int | None, entry: Entry | None = None,
          from_state: str | None = None, to_state: str | None = None, **detail: Any) -> AuditEvent:
    ev = AuditEvent(action=action, user_id=user_id, entry_id=entry.id if entry is not None else None,
                    from_state=from_state, to_state=to_state, detail=detail)
    session.add(ev)
    return ev


def transition(session: Session, entry: Entry, to: str, *, user_id: int | None, **detail: Any) -> None:
    """Move ``entry`` to state ``to`` and log it (the caller commits)."""
    if to not in TRANSITIONS[entry.state]:
        raise LedgerError(f"entry {entry.id} is {entry.state}; it cannot become {to}")
    audit(session, "state", user_id=user_id, entry=entry, from_state=entry.state, to_state=to, **detail)
    entry.state = to
    entry.updated = utcnow()


def next_seq(session: Session) -> int:
    return int(session.scalar(select(func.coalesce(func.max(Entry.seq), 0))) or 0) + 1


def get_state(session: Session, key: str) -> str | None:
    row = session.get(ServiceState, key)
    return row.value if row is not None else None


def set_state(session: Session, key: str, value: str) -> None:
    row = session.get(ServiceState, key)
    if row is None:
        session.add(ServiceState(key=key, value=value))
    else:
        row.value = value


def iso(ts: Any) -> str | None:
    """ISO 8601 in UTC (SQLite returns the stored UTC times without their zone)."""
    if ts is None:
        return None
    return (ts if ts.tzinfo is not None else ts.replace(tzinfo=timezone.utc)).isoformat()


def entry_dict(entry: Entry, user_name: str | None = None) -> dict[str, Any]:
    return {
        "id": entry.id,
        "state": entry.state,
        "user": user_name,
        "user_id": entry.user_id,
        "created": iso(entry.created),
        "updated": iso(entry.updated),
        "request_text": entry.request_text,
        "triples": entry.triples,
        "kg_changes": entry.kg_changes,
        "requests": entry.requests,
        "method": entry.method,
        "config": entry.config,
        "seq": entry.seq,
        "artefact": entry.artefact,
        "artefact_sha256": entry.artefact_sha256,
        "error": entry.error,
    }
