"""The edit delta: a method's result, applied and reverted exactly.

An :class:`EditDelta` is what a method's ``compute()`` returns: a list of parameter updates
(:mod:`kedit.deltas.updates`) plus the provenance needed to apply it safely later (method, config, requests, meta,
a fingerprint of every targeted tensor at compute time, and optional ``extras`` a method carries for its
cross-edit state). Applying records it in the model's rollback ledger (:mod:`kedit.deltas.ledger`), which makes
the revert bitwise exact without a copy per delta; the file format is :mod:`kedit.deltas.serialization`.

Precision
---------
``W + ΔW`` is computed in fp32 (fp64 for fp64 parameters) and cast to the parameter dtype. The result is then
checked: if a touched tensor did not change at all, the update was swallowed by rounding (typical for tiny updates
in bf16) and :class:`DeltaSwallowedError` is raised after restoring the model; if it changed only partly (achieved
``‖ΔW_actual‖ / ‖ΔW‖ < 0.5`` or relative error of the achieved delta ``> 0.5``) a warning is logged and recorded
in :attr:`EditDelta.apply_report`. Application is all-or-nothing: any failure restores every parameter touched so
far.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kedit.deltas.errors import (
    DeltaError,
    DeltaStateError,
    DeltaSwallowedError,
    FingerprintMismatchError,
    NonFiniteDeltaError,
)
from kedit.deltas.ledger import LEDGER_ATTR, LedgerEntry, RollbackLedger, add_update
from kedit.deltas.serialization import kedit_version, read_delta, write_delta
from kedit.deltas.updates import ParamUpdate, get_param
from kedit.fingerprint import model_fingerprint, tensor_fingerprint

__all__ = ["MAX_RELATIVE_ERROR", "MIN_ACHIEVED_RATIO", "EditDelta", "revert_deltas"]

logger = logging.getLogger(__name__)

#: thresholds of the partial-swallow warning
MIN_ACHIEVED_RATIO = 0.5
MAX_RELATIVE_ERROR = 0.5


def _jsonable(name: str, value: Any) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise TypeError(f"EditDelta.{name} must be JSON-serialisable: {e}") from e


def _request_dict(r: Any) -> dict[str, Any]:
    if isinstance(r, Mapping):
        return dict(r)
    if hasattr(r, "to_dict"):
        return dict(r.to_dict())
    if dataclasses.is_dataclass(r) and not isinstance(r, type):
        return dataclasses.asdict(r)
    raise TypeError(f"requests must be dicts or records with to_dict(), got {type(r).__name__}")


@dataclass(eq=False)
class EditDelta:
    """A set of parameter updates plus provenance; applies and reverts exactly (see the module docstring).

    Attributes:
        updates: one :class:`ParamUpdate` per targeted parameter (parameter names are unique).
        method: the method that computed it (``"rome"``, ``"memit"``...).
        config: the method config as a JSON-serialisable dict.
        requests: the edit requests as dicts (``EditRequest.to_dict()``).
        meta: model ``name_or_path``, ``model_type``, kedit version, creation time, base model fingerprint.
        fingerprints: ``param -> tensor_fingerprint`` of each targeted tensor at compute time; ``apply`` refuses a
            model whose tensors differ. Params without a fingerprint are not checked.
        apply_report: filled by :meth:`apply`: per-param requested/achieved norms, relative error and status.
        extras: named tensors a method carries with the delta for its cross-edit state -- never applied to the
            weights, saved and loaded with the delta (e.g. AlphaEdit's edited keys ``"alphaedit.keys.<layer>"``,
            from which the next AlphaEdit edit derives its key cache; see :func:`applied_deltas`).

    One delta object tracks one application at a time (apply it to a second model only after reverting, or use a
    :meth:`copy`).
    """

    updates: list[ParamUpdate]
    method: str = "unknown"
    config: dict[str, Any] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    apply_report: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    extras: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _state: LedgerEntry | None = field(default=None, init=False, repr=False)
    #: loaded from ``edit_originals.safetensors``: the base tensors and the post-apply fingerprints
    _saved_originals: dict[str, torch.Tensor] | None = field(default=None, init=False, repr=False)
    _saved_post: dict[str, str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.updates = list(self.updates)
        if not self.updates:
            raise ValueError("an EditDelta needs at least one update")
        seen: set[str] = set()
        for u in self.updates:
            if not isinstance(u, ParamUpdate):
                raise TypeError(f"updates must be ParamUpdate instances, got {type(u).__name__}")
            if u.param in seen:
                raise ValueError(f"parameter {u.param!r} is updated twice; combine the updates into one")
            seen.add(u.param)
            if not u.is_finite():
                raise NonFiniteDeltaError(f"update of {u.param!r} contains NaN/Inf")
        if dataclasses.is_dataclass(self.config) and not isinstance(self.config, type):
            self.config = dataclasses.asdict(self.config)
        self.config = _jsonable("config", dict(self.config))
        self.requests = _jsonable("requests", [_request_dict(r) for r in self.requests])
        self.meta = _jsonable("meta", dict(self.meta))
        self.fingerprints = dict(self.fingerprints)
        self.extras = dict(self.extras)
        for name, t in self.extras.items():
            if not isinstance(name, str) or not name or not isinstance(t, torch.Tensor):
                raise TypeError(f"extras must map non-empty names to tensors, got {name!r}: {type(t).__name__}")
        if len({u.is_memory for u in self.updates}) > 1:
            raise ValueError("an EditDelta holds either weight updates or memory entries, not both")
        unknown = set(self.fingerprints) - seen
        if unknown:
            raise ValueError(f"fingerprints given for parameters without an update: {sorted(unknown)}")

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        updates: Sequence[ParamUpdate],
        *,
        method: str,
        config: Any = None,
        requests: Sequence[Any] = (),
        meta: Mapping[str, Any] | None = None,
        extras: Mapping[str, torch.Tensor] | None = None,
    ) -> EditDelta:
        """Build a delta for ``model`` in its current state: fingerprints every targeted tensor and fills ``meta``
        (extra ``meta`` entries are merged in)."""
        fps = {}
        for u in updates:
            if u.is_memory:  # a side-memory entry touches no parameter
                continue
            p = get_param(model, u.param)
            if tuple(p.shape) != u.shape:
                raise ValueError(
                    f"update of {u.param!r} has shape {u.shape}, the parameter is {tuple(p.shape)}"
                )
            fps[u.param] = tensor_fingerprint(p)
        cfg = getattr(model, "config", None)
        info: dict[str, Any] = {
            "name_or_path": getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None) or "",
            "model_type": getattr(cfg, "model_type", None),
            "kedit_version": kedit_version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "base_model_fingerprint": model_fingerprint(model),
        }
        info.update(meta or {})
        return cls(
            updates=list(updates),
            method=method,
            config={} if config is None else config,
            requests=list(requests),
            meta=info,
            fingerprints=fps,
            extras=dict(extras or {}),
        )

    def copy(self) -> EditDelta:
        """A not-applied copy sharing the (immutable in practice) update tensors."""
        return EditDelta(
            updates=list(self.updates),
            method=self.method,
            config=dict(self.config),
            requests=[dict(r) for r in self.requests],
            meta=dict(self.meta),
            fingerprints=dict(self.fingerprints),
            extras=dict(self.extras),
        )

    @property
    def params(self) -> list[str]:
        return [u.param for u in self.updates]

    @property
    def is_applied(self) -> bool:
        return self._state is not None

    @property
    def is_memory(self) -> bool:
        """Whether this delta holds side-memory entries (:mod:`kedit.memory`, e.g. GRACE) instead of weight
        updates: applying adds them to the model's memory, reverting removes them by edit id; the weights are
        never changed."""
        return self.updates[0].is_memory

    # -- apply / revert ----------------------------------------------------------------------------------------
    @property
    def application_id(self) -> str | None:
        """A unique id of the current application (a new one for every apply; ``None`` when not applied)."""
        return None if self._state is None else self._state.token

    @property
    def rollback_bytes(self) -> int:
        """Bytes this applied delta holds for its exact rollback (its base copies in the model's ledger; usually
        only the first delta of a chain of edits of a parameter holds one). 0 when not applied. The update
        factors are not counted (:attr:`ParamUpdate.nbytes`)."""
        return 0 if self._state is None else self._state.nbytes

    # -- apply / revert ----------------------------------------------------------------------------------------
    def apply(self, model: nn.Module, *, check: bool = True) -> EditDelta:
        """Add every update to ``model`` in place; returns ``self``.

        Args:
            check: verify the targeted tensors' fingerprints against :attr:`fingerprints` (refuse a different base
                model or state). The rounding check (:class:`DeltaSwallowedError`) always runs.

        Raises:
            DeltaStateError: already applied.
            NonFiniteDeltaError: an update, or an updated weight (fp16 overflow), is not finite.
            FingerprintMismatchError: a targeted tensor is not the one the delta was computed on.
            DeltaSwallowedError: a parameter did not change at all after rounding to its dtype.
        On any error the model is left exactly as it was.
        """
        if self._state is not None:
            raise DeltaStateError(
                f"this {self.method} delta is already applied (to {self.params}); revert it first, or apply a copy()"
            )
        if self.is_memory:
            from kedit.memory import add_entries

            add_entries(model, self.updates)  # all-or-nothing; refuses duplicate ids / a foreign layer
            self.apply_report = {}
            self._state = RollbackLedger.push(model, self, pre={}, post={}, bases={})
            return self
        params: dict[str, nn.Parameter] = {}
        for u in self.updates:
            p = get_param(model, u.param)
            if tuple(p.shape) != u.shape:
                raise DeltaError(
                    f"update of {u.param!r} has shape {u.shape} but the model's parameter is {tuple(p.shape)}"
                )
            if not u.is_finite():
                raise NonFiniteDeltaError(f"update of {u.param!r} contains NaN/Inf")
            params[u.param] = p
        pre = {name: tensor_fingerprint(p) for name, p in params.items()}
        if check:
            for name in params:
                expected = self.fingerprints.get(name)
                if expected is not None and pre[name] != expected:
                    raise FingerprintMismatchError(
                        f"parameter {name!r} differs from the tensor this {self.method} delta was computed on: it "
                        "was computed for a different base model / state; apply the deltas in the order they were "
                        "computed (or pass check=False to override)"
                    )
        ledger = RollbackLedger.of(model)
        # pre-apply copies: needed for all-or-nothing and the rounding check; kept only where a chain starts
        originals: dict[str, torch.Tensor] = {}
        report: dict[str, dict[str, Any]] = {}
        try:
            with torch.no_grad():
                for u in self.updates:
                    p = params[u.param]
                    originals[u.param] = orig = p.detach().clone()
                    new, d = add_update(orig, u)
                    if not bool(torch.isfinite(new).all()):
                        raise NonFiniteDeltaError(
                            f"applying the update of {u.param!r} gives non-finite weights in {p.dtype} (overflow?)"
                        )
                    p.copy_(new)
                    report[u.param] = self._check_rounding(u.param, p, orig, d)
        except BaseException:
            with torch.no_grad():
                for name, orig in originals.items():
                    params[name].copy_(orig)
            raise
        self.apply_report = report
        bases = {
            name: orig
            for name, orig in originals.items()
            if ledger is None or ledger.needs_base(name, pre[name])
        }
        self._state = RollbackLedger.push(
            model,
            self,
            pre=pre,
            post={name: tensor_fingerprint(p) for name, p in params.items()},
            bases=bases,
        )
        return self

    @staticmethod
    def _check_rounding(name: str, p: torch.Tensor, orig: torch.Tensor, d: torch.Tensor) -> dict[str, Any]:
        requested = float(torch.linalg.vector_norm(d.double()).item())
        entry: dict[str, Any] = {"dtype": str(p.dtype).removeprefix("torch."), "norm_requested": requested}
        if requested == 0.0:
            entry.update(norm_achieved=0.0, relative_error=0.0, status="zero")
            return entry
        if torch.equal(p, orig):
            raise DeltaSwallowedError(
                f"the update of {name!r} (‖ΔW‖={requested:.3g}) was entirely swallowed by rounding to "
                f"{p.dtype}: the parameter is unchanged. Scale the edit up or apply it to a higher-precision model"
            )
        achieved = p.to(d.dtype) - orig.to(d.dtype)
        norm_achieved = float(torch.linalg.vector_norm(achieved.double()).item())
        rel_err = float(torch.linalg.vector_norm((achieved - d).double()).item()) / requested
        entry.update(norm_achieved=norm_achieved, relative_error=rel_err, status="ok")
        if norm_achieved / requested < MIN_ACHIEVED_RATIO or rel_err > MAX_RELATIVE_ERROR:
            entry["status"] = "partial"
            logger.warning(
                "update of %r partly swallowed by rounding to %s: achieved ‖ΔW‖ %.3g of requested %.3g "
                "(relative error %.2f)",
                name,
                p.dtype,
                norm_achieved,
                requested,
                rel_err,
            )
        return entry

    def _entry_for(self, model: nn.Module) -> LedgerEntry:
        state = self._state
        if state is None:
            raise DeltaStateError(f"this {self.method} delta is not applied; nothing to revert")
        if state.model is not model or model.__dict__.get(LEDGER_ATTR) is not state.ledger:
            raise DeltaStateError(f"this {self.method} delta was applied to a different model object")
        return state

    def revert(self, model: nn.Module) -> None:
        """Restore the tensors this delta was applied to, bitwise (see :mod:`kedit.deltas.ledger`).

        Refuses when not applied (to this model), when a later live delta touches one of its parameters, or when
        the tensors changed since :meth:`apply` (revert stacked deltas in LIFO order: newest first). The model is
        unchanged when it refuses.
        """
        entry = self._entry_for(model)
        ledger = entry.ledger
        if self.is_memory:
            from kedit.memory import remove_entries

            remove_entries(model, [u.edit_id for u in self.updates], missing_ok=True)
            ledger.pop(entry, model)
            self._state = None
            return
        params = ledger.check_revertible(entry, model, self.method)
        before = {name: ledger.state_before(entry, name, p.device) for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(before[name])
        ledger.pop(entry, model)
        self._state = None

    def originals(self) -> dict[str, torch.Tensor]:
        """The tensors this applied delta was applied to (what :meth:`revert` restores), rebuilt bitwise from the
        model's ledger -- ``save(include_originals=True)`` writes them."""
        if self._state is None:
            raise DeltaStateError(f"this {self.method} delta is not applied; it has no originals")
        entry = self._state
        return {name: entry.ledger.state_before(entry, name) for name in entry.updates}

    @property
    def post_apply_fingerprints(self) -> dict[str, str]:
        """``param -> fingerprint`` of the tensors this applied delta left behind (empty when not applied)."""
        return {} if self._state is None else dict(self._state.post_fingerprints)

    @contextmanager
    def applied(self, model: nn.Module, *, check: bool = True) -> Iterator[EditDelta]:
        """``with delta.applied(model): ...`` applies on entry and reverts on exit (also on exceptions)."""
        self.apply(model, check=check)
        try:
            yield self
        finally:
            self.revert(model)

    # -- inspection --------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """A JSON-serialisable overview (for ``kedit delta inspect``)."""
        return {
            "method": self.method,
            "n_requests": len(self.requests),
            "n_params": len(self.updates),
            "applied": self.is_applied,
            "rollback_bytes": self.rollback_bytes,
            "extras": {k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                       for k, t in self.extras.items()},
            "meta": dict(self.meta),
            "params": [
                {
                    "param": u.param,
                    "kind": u.kind,
                    "shape": list(u.shape),
                    "rank": u.rank,
                    "dtype": str(u.dtype).removeprefix("torch."),
                    "norm": u.norm(),
                    "fingerprint": self.fingerprints.get(u.param),
                }
                for u in self.updates
            ],
        }

    # -- persistence (the format is kedit.deltas.serialization) ------------------------------------------------
    def save(self, directory: str | Path, *, include_originals: bool = False) -> Path:
        """Write ``edit_config.json`` and ``edit_delta.safetensors`` into ``directory`` (created if needed).

        With ``include_originals`` (the delta must be applied), the original tensors are written too
        (``edit_originals.safetensors``), so :meth:`revert_saved` can later undo the edit *bitwise* on a separately
        loaded edited checkpoint -- subtracting ΔW could not (see :mod:`kedit.deltas`).
        """
        return write_delta(self, directory, include_originals=include_originals)

    @classmethod
    def load(cls, directory: str | Path) -> EditDelta:
        """Read a delta written by :meth:`save`, validating the format version and the tensors against the
        config (raises :class:`DeltaFormatError` naming the offending file)."""
        return read_delta(cls, directory)

    @property
    def has_saved_originals(self) -> bool:
        return self._saved_originals is not None

    def revert_saved(self, model: nn.Module) -> None:
        """Undo this (loaded) delta on a model that has it applied -- e.g. an edited checkpoint loaded from disk --
        by restoring the saved original tensors bitwise.

        Refuses unless the delta was saved with ``include_originals=True`` and every targeted tensor is exactly the
        post-apply state (no other edit on top).
        """
        if self._saved_originals is None or self._saved_post is None:
            raise DeltaStateError(
                f"this {self.method} delta was saved without its original tensors; an exact revert needs "
                "save(..., include_originals=True) (kedit edit --save-delta does this by default)"
            )
        params = {name: get_param(model, name) for name in self._saved_originals}
        for name, p in params.items():
            if tensor_fingerprint(p) != self._saved_post[name]:
                raise FingerprintMismatchError(
                    f"parameter {name!r} is not in the state this {self.method} delta left it in (another model, or "
                    "another edit on top): revert in LIFO order"
                )
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self._saved_originals[name].to(device=p.device, dtype=p.dtype))


def revert_deltas(model: nn.Module, deltas: Sequence[EditDelta]) -> None:
    """Revert several applied deltas, in the given order (newest first), as one all-or-nothing step.

    The result is bitwise that of calling :meth:`EditDelta.revert` on each in turn, and the same orders are
    refused (:class:`DeltaStateError`, model unchanged), but each parameter is rebuilt once -- from its base copy
    by replaying only the deltas that stay applied -- instead of once per delta, so undoing a whole sequence of
    ``n`` edits costs ``O(n)`` replays rather than ``O(n²)``.
    """
    deltas = list(deltas)
    if len({id(d) for d in deltas}) != len(deltas):
        raise DeltaStateError("revert_deltas: a delta is listed twice")
    entries = [d._entry_for(model) for d in deltas]
    if not entries:
        return
    ledger = entries[0].ledger
    # simulate the reverts in order: each must be the newest live delta on each of its parameters, and (as the
    # one-by-one revert would see) the tensor it left behind must be the one found when it is reached
    tops = {name: len(chain) for name, chain in ledger.chains.items()}
    lowest: dict[str, LedgerEntry] = {}
    reached: dict[str, str] = {}
    for d, entry in zip(deltas, entries):
        for name in entry.updates:
            chain = ledger.chains[name]
            if chain[tops[name] - 1] is not entry:
                raise DeltaStateError(
                    f"parameter {name!r} was changed by another delta applied after this {d.method} delta and not "
                    "yet reverted: revert in LIFO order (newest first)"
                )
            if name not in reached:
                reached[name] = tensor_fingerprint(get_param(model, name))
            if reached[name] != entry.post_fingerprints[name]:
                raise DeltaStateError(
                    f"parameter {name!r} changed since this {d.method} delta was applied (another delta applied "
                    "on top?): revert in LIFO order (newest first)"
                )
            tops[name] -= 1
            reached[name] = entry.pre_fingerprints[name]
            lowest[name] = entry
    targets = {
        name: ledger.state_before(entry, name, get_param(model, name).device) for name, entry in lowest.items()
    }
    with torch.no_grad():
        for name, t in targets.items():
            get_param(model, name).copy_(t)
    memory_ids = [u.edit_id for d in deltas if d.is_memory for u in d.updates]
    if memory_ids:
        from kedit.memory import remove_entries

        remove_entries(model, memory_ids, missing_ok=True)
    for d, entry in zip(deltas, entries):
        ledger.pop(entry, model)
        d._state = None

