"""Alembic migrations of the service database, shipped inside the package (run by :func:`kedit.service.db.upgrade`)."""
