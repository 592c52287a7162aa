"""The knowledge service: database + KG + editor + the single writer thread that changes the model.

Every change to the served model goes through one queue, worked by one thread (:class:`KnowledgeService`), one
job at a time: edits and rollbacks. An edit job::

    pending --(KG resolution, policy passed at submit; compute on the replica; artefact written)--> applied
            --(KG change + commit order + expected model fingerprint, one transaction)--> committed

The artefact (``write_delta``: safetensors + JSON) is written to a temporary directory and renamed into place
before the entry records it, with the sha256 of its files. On start the served model is the base model plus the
committed entries replayed in commit order, each artefact checked against its stored sha256; the result must have
the fingerprint stored with the last commit (:func:`kedit.service.editor.state_fingerprint`), else the service
refuses to start. Entries left ``applied`` by a crash were never committed: they become ``failed``; ``pending``
ones are queued again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from kedit.deltas import EditDelta, load_delta
from kedit.service.editor import Editor
from kedit.service.kg import (
    DbStore,
    KGController,
    Relation,
    Resolution,
    load_library,
    store_library,
    triple_requests,
)
from kedit.service.ledger import audit, get_state, next_seq, set_state, transition
from kedit.service.models import Entry, User

__all__ = ["KnowledgeService", "ServiceError", "ServiceUnavailable", "artefact_sha256"]

log = logging.getLogger(__name__)

KEY_BASE = "base_model_fingerprint"
KEY_MODEL = "model_name"
KEY_STATE = "model_state_fingerprint"


class ServiceError(RuntimeError):
    """The service cannot start or cannot do what was asked (the message says why)."""


class ServiceUnavailable(ServiceError):
    """A job failed for a reason outside the request (e.g. the database refused the commit) and changed nothing:
    the caller may retry (HTTP 503)."""


def artefact_sha256(directory: str | Path) -> str:
    """sha256 over the artefact's files (names and bytes, in name order)."""
    h = hashlib.sha256()
    for p in sorted(Path(directory).iterdir()):
        if p.is_file():
            h.update(p.name.encode() + b"\0")
            h.update(p.read_bytes())
            h.update(b"\0")
    return h.hexdigest()


class KnowledgeService:
    """Owns the editor and the writer thread (see the module docstring).

    ``artefacts``: the directory of the delta artefacts. ``n_templates``: edit requests per triple (the first
    templates of its relation). ``augment``: OneEdit's KG augmentation (out-edges of the new tail edited too).
    """

    def __init__(self, sessions: sessionmaker[Session], editor: Editor, *, artefacts: str | Path,
                 model_name: str = "", n_templates: int = 2, augment: int = 0) -> None:
        self.sessions = sessions
        self.editor = editor
        self.artefacts = Path(artefacts)
        self.model_name = model_name
        self.n_templates = n_templates
        self.augment = augment
        self._queue: queue.Queue[tuple[Callable[[], Any], Future] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.busy = threading.Event()  # set while the writer works on a job

    # -- start / stop ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Verify the database against the model, replay the committed entries, start the writer."""
        self.artefacts.mkdir(parents=True, exist_ok=True)
        with self.sessions.begin() as s:
            base = get_state(s, KEY_BASE)
            if base is None:
                set_state(s, KEY_BASE, self.editor.base_fingerprint)
                set_state(s, KEY_MODEL, self.model_name)
            elif base != self.editor.base_fingerprint:
                raise ServiceError(
                    f"this database belongs to another base model ({get_state(s, KEY_MODEL) or 'unnamed'}, "
                    f"fingerprint {base[:12]}...); the loaded model has fingerprint "
                    f"{self.editor.base_fingerprint[:12]}... -- serve the model the ledger was built on, or use "
                    "another --db")
        t0 = time.perf_counter()
        self._replay()
        replay_s = time.perf_counter() - t0
        pending = []
        with self.sessions.begin() as s:
            for e in s.scalars(select(Entry).where(Entry.state == "applied")):
                e.error = "the server stopped before this edit was committed"
                transition(s, e, "failed", user_id=None, reason="restart")
            pending = [e.id for e in s.scalars(select(Entry).where(Entry.state == "pending").order_by(Entry.id))]
        self._thread = threading.Thread(target=self._run, name="kedit-writer", daemon=True)
        self._thread.start()
        for i in pending:
            self._submit(lambda i=i: self._edit_job(i))
        log.info("service started: %d committed entries replayed and verified in %.2f s, %d pending queued",
                 len(self.editor.applied), replay_s, len(pending))

    def stop(self, timeout: float | None = 30) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def _replay(self) -> None:
        with self.sessions() as s:
            entries = list(s.scalars(select(Entry).where(Entry.state == "committed").order_by(Entry.seq)))
            expected = get_state(s, KEY_STATE)
        for e in entries:
            path = Path(e.artefact or "")
            if not path.is_dir():
                raise ServiceError(f"entry {e.id}: its artefact {path} is missing")
            sha = artefact_sha256(path)
            if sha != e.artefact_sha256:
                raise ServiceError(f"entry {e.id}: artefact {path} has sha256 {sha[:12]}..., the ledger recorded "
                                   f"{(e.artefact_sha256 or '')[:12]}... (changed on disk?)")
            self.editor.apply(e.id, load_delta(path))
        if expected is not None:
            got = self.editor.fingerprint()
            if got != expected:
                raise ServiceError(f"the replayed model has fingerprint {got[:12]}..., the ledger expects "
                                   f"{expected[:12]}...: the artefacts do not rebuild the committed model")

    # -- the queue -------------------------------------------------------------------------------------------------
    def _submit(self, job: Callable[[], Any]) -> Future:
        if self._thread is None:
            raise ServiceError("the service is not running")
        fut: Future = Future()
        self._queue.put((job, fut))
        return fut

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            job, fut = item
            self.busy.set()
            try:
                fut.set_result(job())
            except ServiceError as e:  # refused (e.g. a second rollback of the same entry): the caller is told
                log.info("writer job refused: %s", e)
                fut.set_exception(e)
            except BaseException as e:  # the writer never dies: the job's caller gets the error
                log.exception("writer job failed")
                fut.set_exception(e)
            finally:
                self.busy.clear()

    def queue_size(self) -> int:
        return self._queue.qsize()

    # -- edits -----------------------------------------------------------------------------------------------------
    def submit_edit(self, session: Session, user: User, triples: list[tuple[str, str, str]], text: str) -> tuple[Entry, Future]:
        """Create a pending entry (in ``session``, committed here) and queue its edit."""
        kg = KGController(DbStore(session), load_library(session), augment=self.augment)
        for t in triples:
            kg.relation(t[1])  # unknown relations are refused before anything is queued
        entry = Entry(user_id=user.id, request_text=text, triples=[list(t) for t in triples],
                      method=self.editor.method, config=self.editor.config_dict(), state="pending")
        session.add(entry)
        session.flush()
        audit(session, "submit", user_id=user.id, entry=entry, to_state="pending")
        session.commit()
        entry_id = entry.id  # the job gets the id, never the request session's object (another thread's)
        return entry, self._submit(lambda: self._edit_job(entry_id))

    def _edit_job(self, entry_id: int) -> str:
        with self.sessions() as s:
            entry = s.get(Entry, entry_id)
            if entry is None or entry.state != "pending":
                return entry.state if entry is not None else "missing"
            kg = KGController(DbStore(s), load_library(s), augment=self.augment)
            try:
                res = kg.resolve_all(entry.triples)
                requests = [q for t in res.edit for q in triple_requests(t, kg.relation(t[1]),
                                                                          n_templates=self.n_templates)]
                delta = self.editor.compute(requests)
                path = self._write_artefact(entry_id, delta)
                self.editor.apply(entry_id, delta)  # all-or-nothing: refuses a swallowed or non-finite delta
            except Exception as e:  # nothing reached the served model: the entry fails with the reason
                s.rollback()
                entry = s.get(Entry, entry_id)
                entry.error = f"{type(e).__name__}: {e}"
                transition(s, entry, "failed", user_id=None, reason="edit")
                s.commit()
                return "failed"
            entry.kg_changes = res.to_dict()
            entry.requests = requests
            try:
                entry.artefact, entry.artefact_sha256 = str(path), artefact_sha256(path)
                transition(s, entry, "applied", user_id=None)
                s.commit()
                entry.kg_changes = kg.apply(res).to_dict()  # with the net change, which rollback undoes
                entry.seq = next_seq(s)
                transition(s, entry, "committed", user_id=None)
                set_state(s, KEY_STATE, self.editor.fingerprint())
                s.commit()
            except BaseException:
                s.rollback()
                self.editor.remove(entry_id)
                raise
            return "committed"

    def _write_artefact(self, entry_id: int, delta: EditDelta, suffix: str = "") -> Path:
        """Write ``delta`` to ``entry-<id><suffix>`` (via a temporary directory, fsynced, renamed into place); a
        recomputed delta gets a new ``suffix`` so the committed artefact stays until its replacement commits."""
        name = f"entry-{entry_id:08d}{suffix}"
        final = self.artefacts / name
        tmp = self.artefacts / (name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        delta.save(tmp)
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        return final

    # -- rollback --------------------------------------------------------------------------------------------------
    def submit_rollback(self, entry_id: int, user: User) -> Future:
        user_id = user.id  # read now: the request's session may expire the object before the job runs
        return self._submit(lambda: self._rollback_job(entry_id, user_id))

    def _rollback_job(self, entry_id: int, user_id: int) -> str:
        """Roll ``entry_id`` back in the model and the KG, all or nothing: if any step fails (the removal, the KG
        replay, an artefact, the database commit), the transaction is rolled back and the served model is restored
        to its state before the job, so the entry stays committed in both and the caller gets
        :class:`ServiceUnavailable`."""
        with self.sessions() as s:
            entry = s.get(Entry, entry_id)
            if entry is None:
                raise ServiceError(f"no ledger entry {entry_id}")
            if entry.state != "committed":
                raise ServiceError(f"entry {entry_id} is {entry.state}; only committed entries can be rolled back")
            snapshot = self.editor.snapshot()
            written: list[Path] = []
            try:
                recomputed = self.editor.remove(entry_id)
                # the KG: this entry and every later committed one undone, the later ones resolved again and
                # reapplied (see KGController.roll_back); their new resolutions replace the stored ones
                chain = list(s.scalars(select(Entry).where(Entry.state == "committed", Entry.seq >= entry.seq)
                                       .order_by(Entry.seq)))
                kg = KGController(DbStore(s), load_library(s), augment=self.augment)
                redone = kg.roll_back([(e.triples, Resolution.from_dict(e.kg_changes or {})) for e in chain])
                for later, res in zip(chain[1:], redone):
                    if res.edit != [tuple(x) for x in (later.kg_changes or {}).get("edit", [])]:
                        log.warning("entry %d: without entry %d its KG resolution changed (%d triples to write, "
                                    "was %d); the model keeps the edits it was given", later.id, entry_id,
                                    len(res.edit), len((later.kg_changes or {}).get("edit", [])))
                    later.kg_changes = res.to_dict()
                for other_id, delta in recomputed.items():
                    other = s.get(Entry, other_id)
                    path = self._write_artefact(other_id, delta, suffix=f".r{entry_id}")
                    written.append(path)
                    other.artefact, other.artefact_sha256 = str(path), artefact_sha256(path)
                    audit(s, "recomputed", user_id=user_id, entry=other, reason=f"rollback of entry {entry_id}")
                transition(s, entry, "rolled_back", user_id=user_id)
                set_state(s, KEY_STATE, self.editor.fingerprint())
                s.commit()
            except BaseException as e:
                s.rollback()
                self.editor.restore(snapshot)
                for path in written:  # new artefacts no committed row names
                    shutil.rmtree(path, ignore_errors=True)
                log.error("rollback of entry %d failed, nothing changed: %s: %s", entry_id, type(e).__name__, e)
                self._audit_quietly("rollback_failed", user_id, entry_id, f"{type(e).__name__}: {e}")
                raise ServiceUnavailable(f"the rollback of entry {entry_id} failed and changed nothing (the entry "
                                         f"is still committed in the model and the KG): {type(e).__name__}: {e}; "
                                         "retry later") from e
            return "rolled_back"

    def _audit_quietly(self, action: str, user_id: int | None, entry_id: int, reason: str) -> None:
        """Record ``action`` in the audit log when the database takes it (it may be what just failed)."""
        try:
            with self.sessions.begin() as s:
                audit(s, action, user_id=user_id, entry=s.get(Entry, entry_id), reason=reason)
        except Exception as e:
            log.error("could not audit %s of entry %d: %s", action, entry_id, e)

    # -- KG --------------------------------------------------------------------------------------------------------
    def import_kg(self, session: Session, triples: list[tuple[str, str, str]], relations: list[Relation],
                  user: User | None) -> dict[str, int]:
        n_rel = store_library(session, relations)
        n_tri = DbStore(session).bulk_add(triples)
        audit(session, "kg_import", user_id=user.id if user else None, triples=n_tri, relations=n_rel)
        session.commit()
        return {"triples": n_tri, "relations": n_rel}
