"""Alembic environment: the connection comes from ``config.attributes["connection"]`` (see
:func:`kedit.service.db.upgrade`); no URL is read from a file."""

from alembic import context

from kedit.service.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
