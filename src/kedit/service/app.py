"""The FastAPI app of the knowledge service (``kedit serve``).

Routes (bearer token in ``Authorization``; the role each needs in brackets; ``/health``, ``/`` (the UI page) and
the OpenAPI schema are public)::

    GET  /health                           liveness, model, method, queue length
    GET  /v1/me                   [viewer] who the token belongs to
    GET  /v1/state                [viewer] the served model's state fingerprint and its applied entries
    POST /v1/ask                  [viewer] {"prompt"} -> {"answer"}
    POST /v1/edits                [editor] {"subject","relation","object"} | {"text"} -> ledger entry (?wait=s)
    GET  /v1/edits                [viewer] the ledger (?state=, ?limit=, ?offset=)
    GET  /v1/edits/{id}           [viewer] one entry
    POST /v1/edits/{id}/rollback  [editor] roll it back in the model and the KG (?wait=s; its author or an admin)
    POST /v1/statements           [editor] {"text"}: natural language -> edit / rollback / query
    GET  /v1/kg                   [viewer] ?entity= its neighbourhood
    GET  /v1/kg/relations         [viewer] the relationship library
    POST /v1/kg/import            [admin]  {"kg_csv", "relationship_library"} (OneEdit's files, as text)
    GET  /v1/users, POST /v1/users, POST /v1/users/{id}/tokens, DELETE /v1/tokens/{id}   [admin]
    GET  /v1/audit                [admin]  the audit log (?entry_id=)
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from kedit.api import PromptTooLongError
from kedit.service import auth
from kedit.service.core import KnowledgeService, ServiceError, ServiceUnavailable
from kedit.service.db import make_engine, make_sessionmaker, upgrade
from kedit.service.editor import Editor
from kedit.service.interpreter import Interpreter, RuleInterpreter
from kedit.service.kg import (
    DbStore,
    KGController,
    KGError,
    load_library,
    load_oneedit,
    testbed_library,
    testbed_triples,
)
from kedit.service.ledger import audit, entry_dict, iso
from kedit.service.models import AuditEvent, Entry, TripleRow, User
from kedit.service.policy import Policy, PolicyError, RulePolicy

__all__ = ["ServiceSettings", "create_app"]

MAX_ID = 2**31 - 1  # ids are 32-bit integers in every database
Id = Annotated[int, PathParam(ge=1, le=MAX_ID)]

log = logging.getLogger(__name__)


@dataclass
class ServiceSettings:
    """What ``kedit serve`` configures. ``kg``: what an empty KG is seeded with -- ``"testbed"`` (the testbed
    world, the default for the testbed models), ``"none"``, or a directory with OneEdit's ``kg.csv`` and
    ``relationship_library.json``."""

    db_url: str = "sqlite:///kedit-service/kedit.db"
    artefacts: str = "kedit-service/artefacts"
    token_file: str | None = "kedit-service/admin-token"
    model: str = "testbed-gpt2"
    method: str = "grace"
    config: dict[str, Any] = field(default_factory=dict)
    kg: str = "testbed"
    n_templates: int = 2
    augment: int = 0
    replica: bool = True
    policy: Policy | None = None
    interpreter: Interpreter | None = None
    max_wait_s: float = 600.0


# -- request bodies ------------------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AskIn(_Body):
    prompt: str = Field(min_length=1, max_length=4000)
    max_new_tokens: int = Field(8, ge=1, le=64)


class EditIn(_Body):
    subject: str | None = Field(None, min_length=1, max_length=500)
    relation: str | None = Field(None, min_length=1, max_length=200)
    object: str | None = Field(None, min_length=1, max_length=500)
    text: str | None = Field(None, min_length=1, max_length=4000)

    @model_validator(mode="after")
    def _one_form(self) -> EditIn:
        triple = (self.subject, self.relation, self.object)
        if self.text is not None and any(x is not None for x in triple):
            raise ValueError("give either text or subject/relation/object, not both")
        if self.text is None and any(x is None or not x.strip() for x in triple):
            raise ValueError("give text, or all three of subject, relation and object (non-blank)")
        return self


class StatementIn(_Body):
    text: str = Field(min_length=1, max_length=4000)


class UserIn(_Body):
    name: str = Field(min_length=1, max_length=200)
    role: str = Field(pattern="^(viewer|editor|admin)$")


class TokenIn(_Body):
    label: str = Field("", max_length=200)


class ImportIn(_Body):
    kg_csv: str = Field("head,relation,tail\n", max_length=50_000_000)
    relationship_library: str = Field("[]", max_length=10_000_000)


# -- the app -------------------------------------------------------------------------------------------------------
def create_app(settings: ServiceSettings | None = None,
               model_loader: Callable[[str], tuple[Any, Any]] | None = None) -> FastAPI:
    """The app; the model is loaded (``model_loader(name)``, default :func:`kedit.api.load_model`), the database
    migrated and the ledger replayed when it starts (its lifespan)."""
    settings = settings or ServiceSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        _startup(app, settings, model_loader)
        try:
            yield
        finally:
            app.state.service.stop()
            app.state.engine.dispose()

    app = FastAPI(title="kedit knowledge service", version="1", lifespan=lifespan,
                  description="A multi-user edit ledger over a knowledge graph and a served model.")
    _routes(app, settings)
    return app


def _startup(app: FastAPI, settings: ServiceSettings, model_loader) -> None:
    from kedit.api import load_model

    engine = make_engine(settings.db_url)
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as s:
        plain = auth.bootstrap_admin(s, settings.token_file)
        if plain is not None:
            log.warning("bootstrap admin token written to %s", settings.token_file)
            _seed_kg(s, settings)
    model, tok = (model_loader or load_model)(settings.model)
    editor = Editor(model, tok, method=settings.method, config=settings.config, replica=settings.replica)
    service = KnowledgeService(sessions, editor, artefacts=settings.artefacts, model_name=settings.model,
                               n_templates=settings.n_templates, augment=settings.augment)
    service.start()
    app.state.engine, app.state.sessions, app.state.service = engine, sessions, service
    app.state.policy = settings.policy or RulePolicy()
    app.state.interpreter = settings.interpreter


def _seed_kg(session: Session, settings: ServiceSettings) -> None:
    from kedit.service.kg import store_library

    if settings.kg == "none":
        return
    if settings.kg == "testbed":
        store_library(session, testbed_library())
        DbStore(session).bulk_add(testbed_triples())
        return
    d = Path(settings.kg)
    triples, rels = load_oneedit((d / "kg.csv").read_text(), (d / "relationship_library.json").read_text())
    store_library(session, rels)
    DbStore(session).bulk_add(triples)


def _routes(app: FastAPI, settings: ServiceSettings) -> None:
    bearer = HTTPBearer(auto_error=False)

    def session_dep(request: Request) -> Iterator[Session]:
        with request.app.state.sessions() as s:
            yield s

    def user_dep(creds: HTTPAuthorizationCredentials | None = Depends(bearer),
                 s: Session = Depends(session_dep)) -> User:
        if creds is None or creds.scheme.lower() != "bearer":
            raise HTTPException(401, "missing bearer token (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})
        user = auth.resolve_token(s, creds.credentials)
        if user is None:
            raise HTTPException(401, "invalid or revoked token", headers={"WWW-Authenticate": "Bearer"})
        return user

    def role(needed: str):
        def dep(user: User = Depends(user_dep)) -> User:
            if not auth.has_role(user.role, needed):
                raise HTTPException(403, f"this needs the {needed} role; {user.name} is {user.role}")
            return user
        return dep

    viewer, editor, admin = role("viewer"), role("editor"), role("admin")

    def svc(request: Request) -> KnowledgeService:
        return request.app.state.service

    def wait_for(fut: concurrent.futures.Future, wait: float) -> None:
        if wait <= 0:
            return
        try:
            fut.result(timeout=min(wait, settings.max_wait_s))
        except concurrent.futures.TimeoutError:
            pass
        except ServiceUnavailable as e:  # failed outside the request and changed nothing: retry later
            raise HTTPException(503, str(e)) from None
        except ServiceError as e:
            raise HTTPException(409, str(e)) from None
        except Exception:  # the entry records the failure; the caller reads it there
            pass

    def names(s: Session) -> dict[int, str]:
        return dict(s.execute(select(User.id, User.name)).all())

    def entry_out(s: Session, entry_id: int) -> dict[str, Any]:
        s.expire_all()
        e = s.get(Entry, entry_id)
        if e is None:
            raise HTTPException(404, f"no ledger entry {entry_id}")
        return entry_dict(e, names(s).get(e.user_id))

    def interpreter(request: Request, s: Session) -> Interpreter:
        it = request.app.state.interpreter
        if it is not None:
            return it
        known = set(s.scalars(select(func.distinct(TripleRow.head))))

        def normalise(name: str) -> str:
            return name if name in known or name.replace(" ", "_") not in known else name.replace(" ", "_")
        return RuleInterpreter(load_library(s), normalise)

    def submit(request: Request, s: Session, user: User, triple: tuple[str, str, str], text: str, wait: float):
        try:
            request.app.state.policy.check(s, user, [triple])
        except PolicyError as e:
            audit(s, "policy_refused", user_id=user.id, triple=list(triple), reason=str(e))
            s.commit()
            raise HTTPException(403, f"policy: {e}") from None
        try:
            entry, fut = svc(request).submit_edit(s, user, [triple], text)
        except KGError as e:
            raise HTTPException(422, str(e)) from None
        wait_for(fut, wait)
        return entry_out(s, entry.id)

    def rollback(request: Request, s: Session, user: User, entry_id: int, wait: float):
        e = s.get(Entry, entry_id) if 1 <= entry_id <= MAX_ID else None
        if e is None:
            raise HTTPException(404, f"no ledger entry {entry_id}")
        if e.user_id != user.id and not auth.has_role(user.role, "admin"):
            raise HTTPException(403, f"entry {entry_id} is another user's; only its author or an admin can roll "
                                     "it back")
        if e.state != "committed":
            raise HTTPException(409, f"entry {entry_id} is {e.state}; only committed entries can be rolled back")
        audit(s, "rollback_requested", user_id=user.id, entry=e)
        s.commit()
        wait_for(svc(request).submit_rollback(entry_id, user), wait)
        return entry_out(s, entry_id)

    Wait = Query(0.0, ge=0, le=600, description="seconds to wait for the writer before answering")

    @app.get("/health")
    def health(request: Request) -> dict[str, Any]:
        service = svc(request)
        return {"status": "ok", "model": service.model_name, "method": service.editor.method,
                "applied_entries": len(service.editor.applied), "queue": service.queue_size(),
                "writer_busy": service.busy.is_set()}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def ui() -> HTMLResponse:
        return HTMLResponse((Path(__file__).resolve().parent / "ui" / "index.html").read_text())

    @app.get("/v1/state")
    def model_state(request: Request, user: User = Depends(viewer)) -> dict[str, Any]:
        """The served model's state fingerprint (every weight byte and the edit memory) and the applied entries."""
        editor = svc(request).editor
        fingerprint, applied = editor.state()  # one locked read: never a state in the middle of a change
        return {"fingerprint": fingerprint, "base_fingerprint": editor.base_fingerprint, "applied": applied}

    @app.get("/v1/me")
    def me(user: User = Depends(viewer)) -> dict[str, Any]:
        return {"id": user.id, "name": user.name, "role": user.role}

    @app.post("/v1/ask")
    def ask(body: AskIn, request: Request, user: User = Depends(viewer)) -> dict[str, str]:
        return {"answer": svc(request).editor.ask(body.prompt, max_new_tokens=body.max_new_tokens)}

    @app.post("/v1/edits", status_code=202)
    def create_edit(body: EditIn, request: Request, wait: float = Wait, user: User = Depends(editor),
                    s: Session = Depends(session_dep)) -> dict[str, Any]:
        if body.text is not None:
            intent = interpreter(request, s).interpret(body.text)
            if intent.op != "edit" or intent.triple is None:
                raise HTTPException(422, f"could not read an edit (head, relation, tail) from the text; it reads as "
                                         f"a {intent.op} (POST /v1/statements takes any intent)")
            triple, text = intent.triple, body.text
        else:
            triple = (body.subject.strip(), body.relation.strip(), body.object.strip())
            text = f"({triple[0]}, {triple[1]}, {triple[2]})"
        return submit(request, s, user, triple, text, wait)

    @app.get("/v1/edits")
    def list_edits(state: str | None = Query(None, pattern="^(pending|applied|committed|failed|rolled_back)$"),
                   limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=MAX_ID),
                   user: User = Depends(viewer), s: Session = Depends(session_dep)) -> list[dict[str, Any]]:
        q = select(Entry).order_by(Entry.id.desc()).limit(limit).offset(offset)
        if state is not None:
            q = q.where(Entry.state == state)
        users = names(s)
        return [entry_dict(e, users.get(e.user_id)) for e in s.scalars(q)]

    @app.get("/v1/edits/{entry_id}")
    def get_edit(entry_id: Id, user: User = Depends(viewer), s: Session = Depends(session_dep)) -> dict[str, Any]:
        return entry_out(s, entry_id)

    @app.post("/v1/edits/{entry_id}/rollback", status_code=202)
    def rollback_edit(entry_id: Id, request: Request, wait: float = Wait, user: User = Depends(editor),
                      s: Session = Depends(session_dep)) -> dict[str, Any]:
        return rollback(request, s, user, entry_id, wait)

    @app.post("/v1/statements")
    def statement(body: StatementIn, request: Request, wait: float = Wait, user: User = Depends(editor),
                  s: Session = Depends(session_dep)) -> dict[str, Any]:
        intent = interpreter(request, s).interpret(body.text)
        out: dict[str, Any] = {"intent": intent.op}
        if intent.op == "edit":
            out["entry"] = submit(request, s, user, intent.triple, body.text, wait)
        elif intent.op == "rollback":
            out["entry"] = rollback(request, s, user, intent.entry_id, wait)
        else:
            out["answer"] = svc(request).editor.ask(intent.prompt)
        return out

    @app.get("/v1/kg")
    def kg_entity(entity: str = Query(min_length=1, max_length=500), user: User = Depends(viewer),
                  s: Session = Depends(session_dep)) -> dict[str, Any]:
        kg = KGController(DbStore(s), [])
        return {"entity": entity, **kg.neighbourhood(entity)}

    @app.get("/v1/kg/relations")
    def kg_relations(user: User = Depends(viewer), s: Session = Depends(session_dep)) -> list[dict[str, Any]]:
        return [r.to_dict() for r in load_library(s)]

    @app.post("/v1/kg/import")
    def kg_import(body: ImportIn, request: Request, user: User = Depends(admin),
                  s: Session = Depends(session_dep)) -> dict[str, int]:
        try:
            triples, rels = load_oneedit(body.kg_csv, body.relationship_library)
        except KGError as e:
            raise HTTPException(422, str(e)) from None
        return svc(request).import_kg(s, triples, rels, user)

    @app.get("/v1/users")
    def list_users(user: User = Depends(admin), s: Session = Depends(session_dep)) -> list[dict[str, Any]]:
        return [{"id": u.id, "name": u.name, "role": u.role, "created": iso(u.created)}
                for u in s.scalars(select(User).order_by(User.id))]

    @app.post("/v1/users", status_code=201)
    def create_user(body: UserIn, user: User = Depends(admin), s: Session = Depends(session_dep)) -> dict[str, Any]:
        try:
            new = auth.create_user(s, body.name, body.role)
        except auth.AuthError as e:
            raise HTTPException(409 if "exists" in str(e) else 422, str(e)) from None
        row, plain = auth.issue_token(s, new, label="created with the user")
        audit(s, "user_created", user_id=user.id, name=new.name, role=new.role)
        s.commit()
        return {"id": new.id, "name": new.name, "role": new.role, "token": plain, "token_id": row.id}

    @app.post("/v1/users/{user_id}/tokens", status_code=201)
    def create_token(user_id: Id, body: TokenIn, user: User = Depends(admin),
                     s: Session = Depends(session_dep)) -> dict[str, Any]:
        target = s.get(User, user_id)
        if target is None:
            raise HTTPException(404, f"no user {user_id}")
        row, plain = auth.issue_token(s, target, label=body.label)
        audit(s, "token_issued", user_id=user.id, for_user=target.id, token_id=row.id)
        s.commit()
        return {"token_id": row.id, "user_id": target.id, "token": plain}

    @app.delete("/v1/tokens/{token_id}")
    def revoke_token(token_id: Id, user: User = Depends(admin), s: Session = Depends(session_dep)) -> dict[str, Any]:
        row = auth.revoke_token(s, token_id)
        if row is None:
            raise HTTPException(404, f"no token {token_id}")
        audit(s, "token_revoked", user_id=user.id, token_id=token_id)
        s.commit()
        return {"token_id": token_id, "revoked": True}

    @app.get("/v1/audit")
    def audit_log(entry_id: int | None = Query(None, ge=1, le=MAX_ID), limit: int = Query(200, ge=1, le=5000),
                  user: User = Depends(admin), s: Session = Depends(session_dep)) -> list[dict[str, Any]]:
        q = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
        if entry_id is not None:
            q = q.where(AuditEvent.entry_id == entry_id)
        return [{"id": a.id, "ts": iso(a.ts), "user_id": a.user_id, "entry_id": a.entry_id,
                 "action": a.action, "from_state": a.from_state, "to_state": a.to_state, "detail": a.detail}
                for a in s.scalars(q)]

    @app.exception_handler(PromptTooLongError)
    async def _too_long(request: Request, exc: PromptTooLongError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(ServiceUnavailable)
    async def _service_unavailable(request: Request, exc: ServiceUnavailable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

