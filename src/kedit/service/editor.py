"""The editor: the served model, the edits applied to it, and how they are computed, applied and removed.

Concurrency. Every forward of the served model (an ask) and every change to it (apply, revert) holds
:attr:`Editor.lock`; the *compute* of an edit does not. Computing reads a model but is not harmless to forwards
running beside it: GRACE, ROME and MEMIT install forward hooks and flip ``requires_grad`` on the model they read
while they compute, and a memory codebook keeps per-forward state. So the editor computes on a private
**replica** (a copy of the base model that receives every delta the served model receives, so the two hold the
same weights and the same memory); asks on the served model go on during the compute and wait only for the
short apply. Without a replica (``replica=False``: half the memory) the compute holds the lock too.

Rollback. A memory method's delta (GRACE, WISE) is removed by rebuilding the memory from empty with the other
entries in their order (removing its edit ids in place would leave a codebook that later entries expanded or split
around it, which differs from what a restart replays). A weight method's
newest delta is reverted bitwise (:meth:`kedit.deltas.EditDelta.revert`); a middle one by reverting the deltas
after it (newest first), reverting it, and recomputing the later edits from their requests on the model without
it -- sequential weight edits do not commute, so their old deltas no longer fit (:meth:`Editor.remove` returns the
recomputed deltas so the ledger can store them).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from kedit.api import PromptTooLongError, context_window, greedy_answers
from kedit.core.context import EditContext
from kedit.deltas import EditDelta
from kedit.fingerprint import model_fingerprint, tensor_fingerprint
from kedit.memory import get_memory
from kedit.methods.registry import get_method
from kedit.requests import as_requests

__all__ = ["Editor", "EditorError", "state_fingerprint"]

log = logging.getLogger(__name__)


class EditorError(RuntimeError):
    """An edit could not be computed, applied or removed (the served model is unchanged)."""


def state_fingerprint(model: nn.Module) -> str:
    """sha256 of everything an edit can change: every parameter byte (:func:`model_fingerprint` with ``full``)
    and, per memory slot, its edit ids and its look-up tensors."""
    h = hashlib.sha256(model_fingerprint(model, full=True).encode())
    for slot, book in sorted(get_memory(model).items()):
        h.update(f"|{slot}|".encode())
        h.update(",".join(book.records).encode())
        for attr in ("keys", "values", "radii", "spans"):
            t = getattr(book, attr, None)
            if t is not None and hasattr(t, "shape"):
                h.update(f"{attr}={tensor_fingerprint(t)}".encode())
    return h.hexdigest()


class Editor:
    """The served ``model`` with the edits of the ledger applied (see the module docstring).

    ``method``/``config``: the registered method every edit uses and its overrides on the architecture preset.
    """

    def __init__(self, model: nn.Module, tok: Any, *, method: str = "grace", config: Mapping[str, Any] | None = None,
                 replica: bool = True) -> None:
        if get_memory(model):
            raise EditorError("the served model must start without edits (its memory is not empty)")
        self.model = model
        self.tok = tok
        self.spec = get_method(method)
        self.config = self.spec.make_config(dict(config or {}), base=self.spec.default_config(model))
        #: re-entrant: a rollback holds it across all its steps, which take it again one by one
        self.lock = threading.RLock()
        self.replica = copy.deepcopy(model) if replica else None
        self.base_fingerprint = model_fingerprint(model, full=True)
        #: entry id -> (delta on the served model, delta on the replica or None), in application order
        self.applied: dict[int, tuple[EditDelta, EditDelta | None]] = {}
        self.ctx = EditContext()

    @property
    def method(self) -> str:
        return self.spec.name

    def config_dict(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self.config)

    # -- reading ---------------------------------------------------------------------------------------------------
    def ask(self, prompt: str, *, max_new_tokens: int = 8) -> str:
        """The greedy continuation of ``prompt`` by the served model (:class:`PromptTooLongError` when the prompt
        and ``max_new_tokens`` do not fit the model's context window)."""
        window = context_window(self.model)
        if window is not None:
            n = len(self.tok(prompt, add_special_tokens=True, verbose=False)["input_ids"])
            if n + max_new_tokens > window:
                raise PromptTooLongError(f"the prompt has {n} tokens; with max_new_tokens={max_new_tokens} it "
                                         f"exceeds the model's context window of {window} tokens")
        with self.lock:
            return greedy_answers(self.model, self.tok, [prompt], max_new_tokens=max_new_tokens)[0]

    def fingerprint(self) -> str:
        with self.lock:
            return state_fingerprint(self.model)

    def state(self) -> tuple[str, list[int]]:
        """The served model's state fingerprint and its applied entries (in order), read together."""
        with self.lock:
            return state_fingerprint(self.model), list(self.applied)

    # -- writing (one caller at a time: the service's writer thread) ----------------------------------------------
    def compute(self, requests: Sequence[Mapping[str, Any]]) -> EditDelta:
        """The delta of ``requests`` for the model in its current state (not applied)."""
        reqs = as_requests(list(requests))
        if not reqs:
            raise EditorError("an edit needs at least one request")
        if self.replica is not None:
            return self.spec.compute(self.replica, self.tok, reqs, self.config, self.ctx)
        with self.lock:
            return self.spec.compute(self.model, self.tok, reqs, self.config, self.ctx)

    def apply(self, entry_id: int, delta: EditDelta) -> None:
        """Apply ``delta`` (computed by :meth:`compute`, or loaded from its artefact) as ``entry_id``'s edit."""
        if entry_id in self.applied:
            raise EditorError(f"entry {entry_id} is applied already")
        twin = delta.copy() if self.replica is not None else None
        with self.lock:
            delta.apply(self.model)
            if twin is not None:
                try:
                    twin.apply(self.replica)
                except BaseException:
                    delta.revert(self.model)
                    raise
            self.applied[entry_id] = (delta, twin)

    def remove(self, entry_id: int) -> dict[int, EditDelta]:
        """Undo ``entry_id``'s edit; returns ``{entry id: new delta}`` for later weight edits that had to be
        recomputed (empty for memory methods and for the newest entry).

        The served model is locked for the whole removal: an ask sees the model before it or after it, never one
        of the intermediate states (the memory emptied and partly refilled; later weight edits reverted). For a
        middle weight edit that includes recomputing the later edits, so asks wait for it."""
        with self.lock:
            if entry_id not in self.applied:
                raise EditorError(f"entry {entry_id} is not applied")
            delta, _ = self.applied[entry_id]
            if delta.is_memory and all(d.is_memory for d, _ in self.applied.values()):
                self._rebuild_memory(entry_id)
                return {}
            order = list(self.applied)
            later = order[order.index(entry_id) + 1:]
            later_requests = {i: self.applied[i][0].requests for i in later}
            for i in reversed(later):
                self._revert(i)
            self._revert(entry_id)
            new: dict[int, EditDelta] = {}
            for i in later:
                d = self.compute(later_requests[i])
                self.apply(i, d)
                new[i] = d
            return new

    def snapshot(self) -> list[tuple[int, EditDelta]]:
        """The applied entries and their deltas on the served model, in order (for :meth:`restore`)."""
        with self.lock:
            return [(i, d) for i, (d, _) in self.applied.items()]

    def restore(self, snapshot: Sequence[tuple[int, EditDelta]]) -> None:
        """Bring the model back to the state of :meth:`snapshot` (after a :meth:`remove` whose ledger commit
        failed, or a removal that failed half-way): every applied delta is reverted, newest first, and the
        snapshot's deltas are applied again in their order -- the computation a restart replays."""
        with self.lock:
            for i in reversed(list(self.applied)):
                self._revert(i)
            for i, d in snapshot:
                self.apply(i, d)

    def _rebuild_memory(self, entry_id: int) -> None:
        """Remove ``entry_id`` from a memory-only model by rebuilding the memory from empty with the other entries
        in their order. Removing an entry in place is not enough: later entries may have expanded or split the
        codebook around its key, and the memory left behind would differ from the one a restart replays."""
        order = [i for i in self.applied if i != entry_id]
        deltas = {i: self.applied[i][0] for i in order}
        with self.lock:
            for i in reversed(list(self.applied)):
                self._revert(i)
            for i in order:
                self.apply(i, deltas[i])

    def _revert(self, entry_id: int) -> None:
        delta, twin = self.applied[entry_id]
        with self.lock:
            delta.revert(self.model)
            if twin is not None:
                twin.revert(self.replica)
            del self.applied[entry_id]
