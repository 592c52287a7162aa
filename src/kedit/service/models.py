"""The service's database schema (SQLAlchemy 2 declarative models).

Tables: ``users`` and ``tokens`` (bearer tokens, stored as sha256 hashes), ``entries`` (the edit ledger),
``audit`` (every state change: who, what, when, from which entry), ``triples`` (the knowledge graph),
``relations`` (OneEdit's relationship library) and ``service_state`` (key/value: the base model's fingerprint
and the expected fingerprint of the served model). The schema is created by the Alembic migrations in
:mod:`kedit.service.migrations`, never by ``create_all``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["ROLES", "STATES", "AuditEvent", "Base", "Entry", "RelationRow", "ServiceState", "Token", "TripleRow",
           "User", "utcnow"]

#: roles, least privileged first
ROLES = ("viewer", "editor", "admin")
#: ledger entry states
STATES = ("pending", "applied", "committed", "failed", "rolled_back")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    role: Mapped[str] = mapped_column(String(20))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Token(Base):
    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str] = mapped_column(String(200), default="")
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Entry(Base):
    """One ledger entry: a request to change the model's knowledge and everything needed to undo or replay it."""

    __tablename__ = "entries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    request_text: Mapped[str] = mapped_column(Text, default="")
    #: the stated triples [[head, relation, tail], ...]
    triples: Mapped[list[Any]] = mapped_column(JSON, default=list)
    #: what the KG controller derived: {"edit": [...], "rollback": [...]} (triples written / removed)
    kg_changes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: the edit requests given to the method (prompt, subject, target_new)
    requests: Mapped[list[Any]] = mapped_column(JSON, default=list)
    method: Mapped[str] = mapped_column(String(50))
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(20), default="pending", index=True)
    #: commit order (set when committed; replay follows it)
    seq: Mapped[int | None] = mapped_column(Integer, nullable=True)
    artefact: Mapped[str | None] = mapped_column(Text, nullable=True)
    artefact_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class AuditEvent(Base):
    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ts: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    entry_id: Mapped[int | None] = mapped_column(ForeignKey("entries.id"), nullable=True)
    action: Mapped[str] = mapped_column(String(50))
    from_state: Mapped[str | None] = mapped_column(String(20), nullable=True)
    to_state: Mapped[str | None] = mapped_column(String(20), nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class TripleRow(Base):
    __tablename__ = "triples"
    __table_args__ = (UniqueConstraint("head", "relation", "tail", name="uq_triple"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    head: Mapped[str] = mapped_column(String(500), index=True)
    relation: Mapped[str] = mapped_column(String(200))
    tail: Mapped[str] = mapped_column(String(500), index=True)


class RelationRow(Base):
    __tablename__ = "relations"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    type: Mapped[str] = mapped_column(String(20), default="")
    reverse: Mapped[str] = mapped_column(String(200), default="")
    #: [r1, r2] when this relation is the composition r1 then r2, else []
    multihop: Mapped[list[Any]] = mapped_column(JSON, default=list)
    #: surface templates, each with one "{}" for the subject
    templates: Mapped[list[Any]] = mapped_column(JSON, default=list)


class ServiceState(Base):
    __tablename__ = "service_state"

    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
