"""The shipped Alembic migrations build exactly the schema the models declare (no autogenerate differences), on
SQLite and PostgreSQL, and running them twice is harmless."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from kedit.service.db import HEAD_REVISION, make_engine, upgrade
from kedit.service.models import Base


def test_migrations_match_the_models(db_url):
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        upgrade(engine)
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn)
            assert ctx.get_current_revision() == HEAD_REVISION
            diffs = compare_metadata(ctx, Base.metadata)
        assert diffs == [], diffs
        assert set(inspect(engine).get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}
    finally:
        engine.dispose()
