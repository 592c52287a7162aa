"""Portable edit deltas with exact rollback.

An :class:`EditDelta` is what a method's ``compute()`` returns: a list of parameter updates plus the provenance
needed to apply it safely later (method, config, requests, meta, and a fingerprint of every targeted tensor at
compute time)::

    delta = EditDelta.for_model(model, [LowRankUpdate.from_math(model, name, u, v)], method="rome", config=cfg)
    delta.apply(model)            # refuses a different base model / state, NaN/Inf, or a swallowed update
    delta.revert(model)           # bitwise restore
    with delta.applied(model):    # apply ... revert (even on exceptions)
        ...
    delta.save("out/edit-1");  delta = load_delta("out/edit-1")
    rollback_bytes(model)         # bytes held for exact rollback of everything applied to model
    revert_deltas(model, deltas)  # several at once, newest first: one replay per parameter

One concept per module:

* :mod:`kedit.deltas.updates` -- the update kinds :class:`ParamUpdate`, :class:`LowRankUpdate` (``ΔW = a @ b``,
  ROME is rank one) and :class:`DenseUpdate` (a full ``ΔW``), in the parameter's storage orientation
  (``from_math`` converts from ``[out, in]``, so GPT-2 ``Conv1D`` weights are handled there and in
  :mod:`kedit.arch` only), and :class:`MemoryEntryUpdate` (an entry of a side memory such as GRACE's codebook,
  :mod:`kedit.memory`: applied by adding it to the model's memory, reverted by removing it by edit id -- in any
  order, weights never touched);
* :mod:`kedit.deltas.delta` -- :class:`EditDelta`: apply (with the rounding checks) and revert;
* :mod:`kedit.deltas.ledger` -- the per-model rollback ledger that makes revert exact with one copy per touched
  parameter, whatever the number of edits (:func:`rollback_bytes`, :func:`applied_deltas`);
* :mod:`kedit.deltas.serialization` -- the on-disk format (:func:`load_delta`);
* :mod:`kedit.deltas.errors` -- the exceptions, all subclasses of :class:`DeltaError`.

Rollback semantics
------------------
* ``revert`` restores the tensors bitwise in fp32, fp16 and bf16. Subtracting the delta would not:
  ``(W + ΔW) - ΔW != W`` once ``W + ΔW`` has been rounded to the parameter dtype (bf16 keeps 8 significant bits),
  so an additive undo slowly corrupts the model. Instead the model's ledger keeps **one** copy of each touched
  parameter as it was before the first live delta touching it, and rebuilds the state before any later delta by
  replaying the deltas in between exactly as ``apply`` computed them (verified by fingerprint). Memory is
  therefore one copy per touched parameter, not one per edit (plus the deltas' own factors); see
  :mod:`kedit.deltas.ledger` for the analysis and the costs.
* Several deltas may be stacked. Reverting is exact in **LIFO order** (newest first, per parameter): ``revert``
  refuses while a later applied delta touches one of its parameters, or when its tensors were changed since.
* Sequential MEMIT/AlphaEdit-style edits do not commute -- each was computed on the already edited model. Removing
  an edit from the *middle* of such a sequence therefore needs a rebuild: revert to the base (LIFO), then replay
  the surviving edits, recomputing their deltas. ``apply`` enforces the precondition by refusing a delta whose
  targeted tensors differ from the ones it was computed on.
* Method state that depends on earlier edits travels with the deltas (:attr:`EditDelta.extras`) and is derived
  from the deltas applied to the model (:func:`applied_deltas`), so reverting a delta also removes its
  influence on later computations (AlphaEdit's key cache).

Precision: ``W + ΔW`` is computed in fp32 (fp64 for fp64 parameters) and cast to the parameter dtype; a
swallowed update raises :class:`DeltaSwallowedError`, a partly swallowed one is reported (see
:mod:`kedit.deltas.delta`). Application is all-or-nothing.
"""

from kedit.deltas.delta import MAX_RELATIVE_ERROR, MIN_ACHIEVED_RATIO, EditDelta, revert_deltas
from kedit.deltas.errors import (
    DeltaError,
    DeltaFormatError,
    DeltaStateError,
    DeltaSwallowedError,
    FingerprintMismatchError,
    NonFiniteDeltaError,
)
from kedit.deltas.ledger import RollbackLedger, applied_deltas, pristine_weights, rollback_bytes
from kedit.deltas.serialization import (
    CONFIG_NAME,
    FORMAT_VERSION,
    ORIGINALS_NAME,
    WEIGHTS_NAME,
    kedit_version,
    load_delta,
)
from kedit.deltas.updates import DenseUpdate, LowRankUpdate, MemoryEntryUpdate, ParamUpdate

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "MAX_RELATIVE_ERROR",
    "MIN_ACHIEVED_RATIO",
    "ORIGINALS_NAME",
    "WEIGHTS_NAME",
    "DeltaError",
    "DeltaFormatError",
    "DeltaStateError",
    "DeltaSwallowedError",
    "DenseUpdate",
    "EditDelta",
    "FingerprintMismatchError",
    "LowRankUpdate",
    "MemoryEntryUpdate",
    "NonFiniteDeltaError",
    "ParamUpdate",
    "RollbackLedger",
    "applied_deltas",
    "pristine_weights",
    "kedit_version",
    "load_delta",
    "revert_deltas",
    "rollback_bytes",
]
