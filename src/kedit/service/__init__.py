"""The knowledge service: a multi-user edit ledger over a knowledge graph and a served model (``kedit serve``).

After OneEdit (Zhang et al., arXiv 2409.07497): people state facts, a KG resolves conflicts and expands each edit
(reverse relations, multi-hop compositions), and an editor writes them into the served model, with rollback.
One concept per module:

* :mod:`~kedit.service.models` -- the database schema; :mod:`~kedit.service.db` -- engines and the Alembic
  migrations shipped in :mod:`kedit.service.migrations`;
* :mod:`~kedit.service.ledger` -- entry states, transitions, the audit log;
* :mod:`~kedit.service.kg` -- the KG controller and the relationship library;
* :mod:`~kedit.service.interpreter` -- natural language -> edit / rollback / query;
* :mod:`~kedit.service.policy` -- the hook that may refuse an edit;
* :mod:`~kedit.service.editor` -- the served model, compute / apply / remove;
* :mod:`~kedit.service.core` -- the single writer thread, replay on start;
* :mod:`~kedit.service.auth` -- users, roles, hashed tokens;
* :mod:`~kedit.service.app` -- the FastAPI app; ``ui/index.html`` -- the web page it serves.

Nothing here is imported by ``import kedit``; the service needs the ``service`` extra.
"""
