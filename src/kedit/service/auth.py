"""Users, roles and bearer tokens.

A token is ``kedit_`` + 32 random url-safe bytes; only its sha256 is stored, so a leaked database does not leak
usable tokens. Roles are ordered ``viewer < editor < admin`` (:data:`kedit.service.models.ROLES`): viewers ask
and read, editors also edit and roll back their own entries, admins roll back any entry and manage users, tokens
and the KG.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from kedit.service.models import ROLES, Token, User, utcnow

__all__ = ["TOKEN_PREFIX", "AuthError", "bootstrap_admin", "create_user", "has_role", "hash_token", "issue_token",
           "resolve_token", "write_token_file"]

TOKEN_PREFIX = "kedit_"


class AuthError(ValueError):
    """Bad user or token input (unknown role, duplicate name, ...)."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def has_role(role: str, needed: str) -> bool:
    """Whether ``role`` is at least ``needed``."""
    return ROLES.index(role) >= ROLES.index(needed)


def create_user(session: Session, name: str, role: str) -> User:
    name = name.strip()
    if not name:
        raise AuthError("a user needs a non-empty name")
    if role not in ROLES:
        raise AuthError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    if session.scalar(select(User).where(User.name == name)) is not None:
        raise AuthError(f"a user named {name!r} exists already")
    user = User(name=name, role=role)
    session.add(user)
    session.flush()
    return user


def issue_token(session: Session, user: User, label: str = "") -> tuple[Token, str]:
    """A new token for ``user``: ``(row, plaintext)``; the plaintext is shown once and never stored."""
    plain = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = Token(user_id=user.id, token_hash=hash_token(plain), label=label)
    session.add(row)
    session.flush()
    return row, plain


def resolve_token(session: Session, token: str) -> User | None:
    """The user a live (not revoked) token belongs to, or ``None``."""
    row = session.scalar(select(Token).where(Token.token_hash == hash_token(token), Token.revoked.is_(None)))
    return session.get(User, row.user_id) if row is not None else None


def revoke_token(session: Session, token_id: int) -> Token | None:
    row = session.get(Token, token_id)
    if row is not None and row.revoked is None:
        row.revoked = utcnow()
    return row


def write_token_file(path: str | Path, token: str) -> Path:
    """Write ``token`` to ``path`` with mode 0600 (created so; never world-readable, not even briefly)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (token + "\n").encode())
    finally:
        os.close(fd)
    os.chmod(path, 0o600)
    return path


def bootstrap_admin(session: Session, token_file: str | Path | None) -> str | None:
    """On a database without users: create ``admin`` with a token, write it to ``token_file`` and return it;
    otherwise ``None``. Refuses an empty database without a token file (nobody could log in)."""
    if session.scalar(select(func.count()).select_from(User)):
        return None
    if token_file is None:
        raise AuthError("the database has no users: give --token-file so the bootstrap admin token can be written")
    user = create_user(session, "admin", "admin")
    _, plain = issue_token(session, user, label="bootstrap")
    write_token_file(token_file, plain)
    return plain
