"""The policy hook: decides whether an edit may be applied, before anything is computed.

:class:`Policy` is the interface (an edit-type detector such as KETI plugs in here later); :class:`RulePolicy`
implements a relation allow-list and a per-user limit of edits per rolling day.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from kedit.service.models import Entry, User, utcnow

__all__ = ["Policy", "PolicyError", "RulePolicy"]


class PolicyError(PermissionError):
    """The policy refused the edit (the message says why)."""


class Policy(Protocol):
    def check(self, session: Session, user: User, triples: Sequence[tuple[str, str, str]]) -> None:
        """Raise :class:`PolicyError` to refuse."""


class RulePolicy:
    """``allowed_relations``: only these relations may be edited (``None``: any); ``max_edits_per_day``: at most
    this many ledger entries per user in the last 24 hours (``None``: no limit; admins are exempt)."""

    def __init__(self, allowed_relations: Iterable[str] | None = None, max_edits_per_day: int | None = None) -> None:
        self.allowed = set(allowed_relations) if allowed_relations is not None else None
        if max_edits_per_day is not None and max_edits_per_day < 0:
            raise ValueError("max_edits_per_day must be >= 0")
        self.max_per_day = max_edits_per_day

    def check(self, session: Session, user: User, triples: Sequence[tuple[str, str, str]]) -> None:
        if self.allowed is not None:
            bad = sorted({r for _, r, _ in triples if r not in self.allowed})
            if bad:
                raise PolicyError(f"relation(s) {', '.join(bad)} may not be edited here; allowed: "
                                  f"{', '.join(sorted(self.allowed))}")
        if self.max_per_day is not None and user.role != "admin":
            since = utcnow() - timedelta(days=1)
            n = session.scalar(select(func.count()).select_from(Entry)
                               .where(Entry.user_id == user.id, Entry.created >= since)) or 0
            if n >= self.max_per_day:
                raise PolicyError(f"user {user.name!r} reached the limit of {self.max_per_day} edits per day")
