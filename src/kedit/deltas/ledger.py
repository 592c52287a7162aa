"""The rollback ledger: exact revert with memory that does not grow with the number of edits.

Why not keep a copy per delta
-----------------------------
Reverting by subtraction is not exact (``round(W + ΔW) - ΔW != W`` once the sum is rounded to the parameter dtype),
so something must remember the weights as they were. Keeping a full copy of every touched tensor *per applied
delta* is exact but costs ``n`` copies after ``n`` sequential edits of one layer (gigabytes per edit for MEMIT on a
7B model).

What the ledger keeps instead
-----------------------------
Per model, a :class:`RollbackLedger` records the applied deltas in order. For every touched parameter it keeps
**one base copy** -- the tensor before the first live delta that touched it -- plus the chain of live deltas
touching it. The state before the ``k``-th delta of a chain is recomputed by *replaying* the earlier ones exactly as
:meth:`~kedit.deltas.EditDelta.apply` computed them::

    W_0 = base,   W_i = cast_dtype(cast_c(W_{i-1}) + ΔW_i)       (c = fp32, fp64 for fp64 parameters)

Every step is the same deterministic sequence of operations on the same inputs, so the replay is bitwise equal to
what apply produced, in fp32, fp16 and bf16 alike (no bits are reconstructed: the rounding happens again). This is
*checked*, not assumed: apply records the fingerprint of the tensor it started from and revert refuses (leaving
the model untouched) if the replay does not reproduce it -- e.g. when the update tensors of an applied delta were
modified in place. If a parameter is found changed outside the ledger when a delta is applied on top of a chain
(or with ``check=False`` on a foreign state), the chain cannot be replayed through that change, so that delta keeps
its own base copy of the tensor it started from (the old behaviour, only where it is needed).

Memory: one copy of each touched parameter (plus the deltas' own factors, which the ledger references for the
replay, keeping them alive until the delta is reverted). Time: reverting the ``k``-th delta of a chain replays
``k - 1`` updates (an add and a cast each; rank-r factors are multiplied out first), so reverting ``n`` sequential
edits of one layer one by one costs ``O(n²)`` replays -- the price of ``O(1)`` memory. Revert order is
**per-parameter LIFO**: a delta can be reverted when no later live delta touches any of its parameters (deltas on
disjoint parameters revert in any order).

Where the ledger lives
----------------------
On the model object itself, under one attribute (:data:`LEDGER_ATTR`), created by the first apply and removed by
the last revert -- so a model with no applied delta carries nothing, the pristine copies die with the model (no
module-level registry that could leak models or confuse two of them), and ``delta.apply(model)`` /
``delta.revert(model)`` need no extra object from the caller. ``copy.deepcopy(model)`` and pickling give the copy an
*empty* ledger: the deltas applied to the original belong to the original (reverting them on the copy is refused,
as before), and the copy's current weights are its new starting point.
"""

from __future__ import annotations

import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kedit.deltas.errors import DeltaStateError
from kedit.deltas.updates import ParamUpdate, get_param
from kedit.fingerprint import tensor_fingerprint

if TYPE_CHECKING:
    from kedit.deltas.delta import EditDelta

__all__ = ["LEDGER_ATTR", "LedgerEntry", "RollbackLedger", "applied_deltas", "pristine_weights", "rollback_bytes"]

#: the attribute of the model object that holds its ledger while at least one delta is applied
LEDGER_ATTR = "_kedit_rollback_ledger"


def compute_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype ``W + ΔW`` is computed in before the cast back: fp64 for fp64 parameters, else fp32."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def add_update(w: torch.Tensor, update: ParamUpdate) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cast(cast_c(w) + ΔW), ΔW)`` -- the one definition of "apply an update" that apply and replay share."""
    cdt = compute_dtype(w.dtype)
    d = update.dense(dtype=cdt, device=w.device)
    return (w.to(cdt) + d).to(w.dtype), d


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass(eq=False)
class LedgerEntry:
    """One application of one delta: what revert needs (see the module docstring)."""

    ledger: RollbackLedger
    delta: EditDelta
    updates: dict[str, ParamUpdate]
    pre_fingerprints: dict[str, str]
    post_fingerprints: dict[str, str]
    #: full copies of the pre-apply tensor, only for the parameters where this entry starts a chain
    bases: dict[str, torch.Tensor] = field(default_factory=dict)
    #: unique id of this application (a re-application of the same delta gets a new one)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def model(self) -> nn.Module | None:
        return self.ledger.model()

    @property
    def nbytes(self) -> int:
        """Bytes of the base copies this entry holds."""
        return sum(_nbytes(t) for t in self.bases.values())


class RollbackLedger:
    """The applied deltas of one model and the base copies that make their revert exact."""

    def __init__(self, model: nn.Module | None = None) -> None:
        self.model: weakref.ref[nn.Module] | Any = weakref.ref(model) if model is not None else (lambda: None)
        self.entries: list[LedgerEntry] = []
        #: param -> the live entries touching it, in apply order
        self.chains: dict[str, list[LedgerEntry]] = {}

    # a copied / unpickled model starts with an empty ledger (see the module docstring)
    def __deepcopy__(self, memo: dict) -> RollbackLedger:
        return RollbackLedger()

    def __reduce__(self) -> tuple:
        return (RollbackLedger, ())

    @classmethod
    def of(cls, model: nn.Module) -> RollbackLedger | None:
        """The ledger of ``model`` (``None`` when no delta is applied to it)."""
        ledger = model.__dict__.get(LEDGER_ATTR)
        if ledger is None or not ledger.entries:
            return None
        if ledger.model() is not model:  # a copy carrying a stale ledger object
            return None
        return ledger

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def needs_base(self, name: str, fingerprint: str) -> bool:
        """Whether a delta applied now to parameter ``name`` (currently ``fingerprint``) must keep its own base
        copy: true unless the tensor is exactly what the newest live delta touching it left behind."""
        chain = self.chains.get(name)
        return not chain or chain[-1].post_fingerprints[name] != fingerprint

    # -- mutation (called by EditDelta.apply / revert) ----------------------------------------------------------
    @staticmethod
    def push(
        model: nn.Module,
        delta: EditDelta,
        pre: dict[str, str],
        post: dict[str, str],
        bases: dict[str, torch.Tensor],
    ) -> LedgerEntry:
        ledger = model.__dict__.get(LEDGER_ATTR)
        if ledger is None or ledger.model() is not model:
            ledger = RollbackLedger(model)
            setattr(model, LEDGER_ATTR, ledger)
        entry = LedgerEntry(
            ledger=ledger,
            delta=delta,
            updates={u.param: u for u in delta.updates if not u.is_memory},  # memory entries touch no parameter
            pre_fingerprints=dict(pre),
            post_fingerprints=dict(post),
            bases=dict(bases),
        )
        ledger.entries.append(entry)
        for name in entry.updates:
            ledger.chains.setdefault(name, []).append(entry)
        return entry

    def check_revertible(self, entry: LedgerEntry, model: nn.Module, what: str) -> dict[str, nn.Parameter]:
        """The parameters of ``entry`` if it can be reverted now; raises :class:`DeltaStateError` otherwise."""
        params = {name: get_param(model, name) for name in entry.updates}
        for name, p in params.items():
            chain = self.chains.get(name, [])
            if not chain or chain[-1] is not entry:
                raise DeltaStateError(
                    f"parameter {name!r} was changed by another delta applied after this {what} delta and not yet "
                    "reverted: revert in LIFO order (newest first)"
                )
            if tensor_fingerprint(p) != entry.post_fingerprints[name]:
                raise DeltaStateError(
                    f"parameter {name!r} changed since this {what} delta was applied (another delta applied "
                    "on top?): revert in LIFO order (newest first)"
                )
        return params

    def state_before(self, entry: LedgerEntry, name: str, device: torch.device | None = None) -> torch.Tensor:
        """The tensor ``name`` held just before ``entry`` was applied, rebuilt bitwise (nearest base copy, then
        replay of the live deltas in between; verified against the recorded fingerprint)."""
        if name in entry.bases:
            base = entry.bases[name]
            return base if device is None else base.to(device)
        chain = self.chains[name]
        i = chain.index(entry)
        j = i - 1
        while name not in chain[j].bases:  # chain[0] always has a base
            j -= 1
        w = chain[j].bases[name]
        w = w.clone() if device is None else w.to(device, copy=True)
        with torch.no_grad():
            for e in chain[j:i]:
                w, _ = add_update(w, e.updates[name])
        if tensor_fingerprint(w) != entry.pre_fingerprints[name]:
            raise DeltaStateError(
                f"replaying the live deltas on {name!r} did not reproduce the tensor this {entry.delta.method} delta "
                "was applied to (were the update tensors of an applied delta modified in place?); the model is "
                "left unchanged"
            )
        return w

    def pop(self, entry: LedgerEntry, model: nn.Module) -> None:
        self.entries.remove(entry)
        for name in entry.updates:
            chain = self.chains[name]
            chain.remove(entry)
            if not chain:
                del self.chains[name]
        if not self.entries and model.__dict__.get(LEDGER_ATTR) is self:
            delattr(model, LEDGER_ATTR)


def rollback_bytes(model: nn.Module) -> int:
    """Bytes held for exact rollback of every delta applied to ``model`` (the base copies; the deltas' own factors
    are not counted -- see :attr:`ParamUpdate.nbytes <kedit.deltas.ParamUpdate.nbytes>`). 0 when none is applied."""
    ledger = RollbackLedger.of(model)
    return 0 if ledger is None else ledger.nbytes


def applied_deltas(model: nn.Module) -> list[EditDelta]:
    """The deltas currently applied to ``model``, oldest first (e.g. AlphaEdit derives its key cache from them)."""
    ledger = RollbackLedger.of(model)
    return [] if ledger is None else [e.delta for e in ledger.entries]


@contextmanager
def pristine_weights(model: nn.Module) -> Iterator[int]:
    """Inside the ``with``, every parameter touched by a delta applied to ``model`` holds its base copy -- the
    weights before the first live delta touching it, i.e. the *original* model as far as weight deltas go (side
    memories are hooks, not parameters, and stay). The current tensors are restored bitwise on exit, whatever
    happens. Yields the number of parameters swapped (0 when no delta is applied). Used by norm anchoring
    (:mod:`kedit.core.walk`) to read the original model's value norms without keeping a second model."""
    ledger = RollbackLedger.of(model)
    swapped: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        if ledger is not None:
            with torch.no_grad():
                for name, chain in ledger.chains.items():
                    if not chain or name not in chain[0].bases:
                        continue
                    p = get_param(model, name)
                    current = p.detach().clone()
                    p.copy_(chain[0].bases[name].to(device=p.device, dtype=p.dtype))
                    swapped.append((p, current))
        yield len(swapped)
    finally:
        with torch.no_grad():
            for p, current in swapped:
                p.copy_(current)
