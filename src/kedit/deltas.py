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

Update kinds (all in the parameter's **storage** orientation; ``from_math`` converts from math orientation
``[out, in]`` via :func:`kedit.arch.is_transposed`, so GPT-2 ``Conv1D`` weights are handled here and in
``kedit.arch`` only):

* :class:`LowRankUpdate` ``ΔW = a @ b`` (``a: [rows, r]``, ``b: [r, cols]``) -- ROME is ``r = 1``.
* :class:`DenseUpdate` a full-shape ``ΔW``.

Rollback semantics
------------------
* ``apply`` keeps a clone of the **original** tensor of every touched parameter (same device and dtype) and
  ``revert`` copies it back, so revert is bitwise exact in fp32, fp16 and bf16. Subtracting the delta would not
  be: ``(W + ΔW) - ΔW != W`` once ``W + ΔW`` has been rounded to the parameter dtype (bf16 keeps 8 significant
  bits), so an additive undo slowly corrupts the model.
* Several deltas may be stacked. Reverting is exact when done in **LIFO order** (newest first): each delta records
  a fingerprint of the tensors it produced, and ``revert`` refuses when they were changed since (e.g. another delta
  applied on top and not yet reverted).
* Sequential MEMIT/AlphaEdit-style edits do not commute -- each was computed on the already edited model. Removing
  an edit from the *middle* of such a sequence therefore needs a rebuild: revert to the base (LIFO), then replay
  the surviving edits, recomputing their deltas. ``apply`` enforces the precondition by refusing a delta whose
  targeted tensors differ from the ones it was computed on.

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
import math
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from kedit.fingerprint import model_fingerprint, tensor_fingerprint

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "DeltaError",
    "DeltaFormatError",
    "DeltaStateError",
    "DeltaSwallowedError",
    "DenseUpdate",
    "EditDelta",
    "FingerprintMismatchError",
    "LowRankUpdate",
    "NonFiniteDeltaError",
    "ParamUpdate",
    "load_delta",
]

logger = logging.getLogger(__name__)

#: version of the on-disk format written by :meth:`EditDelta.save`
FORMAT_VERSION = 1
CONFIG_NAME = "edit_config.json"
WEIGHTS_NAME = "edit_delta.safetensors"
#: optional file with the pre-apply tensors, written by ``save(..., include_originals=True)``
ORIGINALS_NAME = "edit_originals.safetensors"
_FORMAT_TAG = "kedit-edit-delta"

#: thresholds of the partial-swallow warning
MIN_ACHIEVED_RATIO = 0.5
MAX_RELATIVE_ERROR = 0.5


# -- errors ------------------------------------------------------------------------------------------------------
class DeltaError(RuntimeError):
    """Base class of every error raised by :mod:`kedit.deltas`."""


class NonFiniteDeltaError(DeltaError, ValueError):
    """An update (or the updated weight) contains NaN or Inf."""


class FingerprintMismatchError(DeltaError):
    """A targeted tensor differs from the one the delta was computed on."""


class DeltaSwallowedError(DeltaError):
    """Rounding to the parameter dtype swallowed the whole update of a parameter."""


class DeltaStateError(DeltaError):
    """Apply/revert called in the wrong state (already applied, not applied, out-of-order revert...)."""


class DeltaFormatError(DeltaError, ValueError):
    """An on-disk delta is missing, corrupted or of an unsupported format version."""


def kedit_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kedit")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without metadata
        return "0+unknown"


def _check_finite(param: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{param}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not (t.is_floating_point() or t.is_complex()):
        raise TypeError(f"{param}: {name} must be a floating-point tensor, got {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise NonFiniteDeltaError(f"update of {param!r}: {name} has {bad} non-finite (NaN/Inf) value(s)")


def _owning_module(model: nn.Module, param_name: str) -> nn.Module:
    module_path, _, leaf = param_name.rpartition(".")
    if leaf != "weight":
        raise ValueError(
            f"from_math expects the weight of a Linear/Conv1D module, got parameter {param_name!r}"
        )
    try:
        return model.get_submodule(module_path)
    except AttributeError as e:
        raise ValueError(f"model has no module {module_path!r} (from parameter {param_name!r})") from e


def _get_param(model: nn.Module, name: str) -> nn.Parameter:
    try:
        return model.get_parameter(name)
    except AttributeError as e:
        raise DeltaError(
            f"model ({type(model).__name__}) has no parameter {name!r}: the delta was computed for another "
            "architecture"
        ) from e


# -- parameter updates -------------------------------------------------------------------------------------------
@dataclass(eq=False)
class ParamUpdate:
    """Base class of a change to one parameter, in the parameter's storage orientation."""

    param: str
    kind: ClassVar[str] = ""

    @property
    def shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def rank(self) -> int:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    def dense(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """The full ``ΔW`` in storage orientation (fp32 unless ``dtype`` says otherwise)."""
        raise NotImplementedError

    def norm(self) -> float:
        """Frobenius norm of ``ΔW`` (computed in fp64)."""
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors for serialisation (suffixes appended to ``param``)."""
        raise NotImplementedError

    def is_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self.tensors().values())


@dataclass(eq=False)
class LowRankUpdate(ParamUpdate):
    """``ΔW_storage = a @ b`` with ``a: [rows, r]`` and ``b: [r, cols]`` in storage orientation.

    A rank-one ROME edit is ``r = 1``. Use :meth:`from_math` to build it from a math-orientation ``left @ right``.
    """

    a: torch.Tensor = field(default=None)  # type: ignore[assignment]
    b: torch.Tensor = field(default=None)  # type: ignore[assignment]
    kind: ClassVar[str] = "low_rank"

    def __post_init__(self) -> None:
        _check_finite(self.param, "a", self.a)
        _check_finite(self.param, "b", self.b)
        if self.a.ndim != 2 or self.b.ndim != 2 or self.a.shape[1] != self.b.shape[0]:
            raise ValueError(
                f"update of {self.param!r}: need a [rows, r] and b [r, cols], got {tuple(self.a.shape)} and "
                f"{tuple(self.b.shape)}"
            )
        if self.a.dtype != self.b.dtype:
            raise ValueError(f"update of {self.param!r}: a is {self.a.dtype} but b is {self.b.dtype}")

    @classmethod
    def from_math(
        cls, model: nn.Module, param_name: str, left: torch.Tensor, right: torch.Tensor
    ) -> LowRankUpdate:
        """From math orientation ``ΔW_math = left @ right`` (``left: [out, r]``, ``right: [r, in]``; 1-D vectors
        are read as ``[out, 1]`` and ``[1, in]``). For ``Conv1D`` (stored ``[in, out]``): ``a = rightᵀ``,
        ``b = leftᵀ``."""
        from kedit.arch import is_transposed

        module = _owning_module(model, param_name)
        left = left[:, None] if left.ndim == 1 else left
        right = right[None, :] if right.ndim == 1 else right
        if is_transposed(module):
            a, b = right.T, left.T
        else:
            a, b = left, right
        upd = cls(param_name, a.detach().contiguous(), b.detach().contiguous())
        weight_shape = tuple(_get_param(model, param_name).shape)
        if upd.shape != weight_shape:
            raise ValueError(
                f"{param_name}: left @ right is {tuple(left.shape[:1]) + tuple(right.shape[1:])} in math "
                f"orientation, which gives {upd.shape} in storage orientation; the weight is {weight_shape}"
            )
        return upd

    @property
    def shape(self) -> tuple[int, ...]:
        return (int(self.a.shape[0]), int(self.b.shape[1]))

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    def dense(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> torch.Tensor:
        a = self.a.to(device=device, dtype=dtype)
        b = self.b.to(device=device, dtype=dtype)
        return a @ b

    def norm(self) -> float:
        a, b = self.a.detach().double().cpu(), self.b.detach().double().cpu()
        # ‖a b‖_F² = tr((aᵀa)(b bᵀ)) without forming the product
        sq = torch.trace((a.T @ a) @ (b @ b.T)).item()
        return math.sqrt(max(sq, 0.0))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"a": self.a, "b": self.b}


@dataclass(eq=False)
class DenseUpdate(ParamUpdate):
    """A full-shape ``ΔW`` in storage orientation (also for biases / norms)."""

    delta: torch.Tensor = field(default=None)  # type: ignore[assignment]
    kind: ClassVar[str] = "dense"

    def __post_init__(self) -> None:
        _check_finite(self.param, "delta", self.delta)

    @classmethod
    def from_math(cls, model: nn.Module, param_name: str, delta: torch.Tensor) -> DenseUpdate:
        """From a math-orientation ``[out, in]`` ``ΔW`` of a Linear/Conv1D weight."""
        from kedit.arch import to_storage

        module = _owning_module(model, param_name)
        upd = cls(param_name, to_storage(module, delta.detach()).contiguous())
        weight_shape = tuple(_get_param(model, param_name).shape)
        if upd.shape != weight_shape:
            raise ValueError(
                f"{param_name}: delta is {upd.shape} in storage orientation, weight is {weight_shape}"
            )
        return upd

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.delta.shape)

    @property
    def rank(self) -> int:
        """The nominal (maximal) rank ``min(shape)``; use ``torch.linalg.matrix_rank(dense())`` for the numerical
        one."""
        return min(self.shape) if self.delta.ndim >= 2 else 1

    @property
    def dtype(self) -> torch.dtype:
        return self.delta.dtype

    def dense(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> torch.Tensor:
        return self.delta.to(device=device, dtype=dtype)

    def norm(self) -> float:
        return float(torch.linalg.vector_norm(self.delta.detach().double()).item())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"delta": self.delta}


_KINDS: dict[str, type[ParamUpdate]] = {LowRankUpdate.kind: LowRankUpdate, DenseUpdate.kind: DenseUpdate}


# -- the delta ---------------------------------------------------------------------------------------------------
@dataclass
class _AppliedState:
    model: weakref.ref[nn.Module]
    originals: dict[str, torch.Tensor]
    post_fingerprints: dict[str, str]


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


def _compute_dtype(param_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if param_dtype == torch.float64 else torch.float32


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
    _state: _AppliedState | None = field(default=None, init=False, repr=False)
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
    ) -> EditDelta:
        """Build a delta for ``model`` in its current state: fingerprints every targeted tensor and fills ``meta``
        (extra ``meta`` entries are merged in)."""
        fps = {}
        for u in updates:
            p = _get_param(model, u.param)
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
        )

    @property
    def params(self) -> list[str]:
        return [u.param for u in self.updates]

    @property
    def is_applied(self) -> bool:
        return self._state is not None

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
        params: dict[str, nn.Parameter] = {}
        for u in self.updates:
            p = _get_param(model, u.param)
            if tuple(p.shape) != u.shape:
                raise DeltaError(
                    f"update of {u.param!r} has shape {u.shape} but the model's parameter is {tuple(p.shape)}"
                )
            if not u.is_finite():
                raise NonFiniteDeltaError(f"update of {u.param!r} contains NaN/Inf")
            params[u.param] = p
        if check:
            for name, p in params.items():
                expected = self.fingerprints.get(name)
                if expected is not None and tensor_fingerprint(p) != expected:
                    raise FingerprintMismatchError(
                        f"parameter {name!r} differs from the tensor this {self.method} delta was computed on: it "
                        "was computed for a different base model / state; apply the deltas in the order they were "
                        "computed (or pass check=False to override)"
                    )

        originals: dict[str, torch.Tensor] = {}
        report: dict[str, dict[str, Any]] = {}
        try:
            with torch.no_grad():
                for u in self.updates:
                    p = params[u.param]
                    originals[u.param] = orig = p.detach().clone()
                    cdt = _compute_dtype(p.dtype)
                    d = u.dense(dtype=cdt, device=p.device)
                    new = (orig.to(cdt) + d).to(p.dtype)
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
        self._state = _AppliedState(
            model=weakref.ref(model),
            originals=originals,
            post_fingerprints={name: tensor_fingerprint(p) for name, p in params.items()},
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

    def revert(self, model: nn.Module) -> None:
        """Restore the original tensors bitwise. Refuses when not applied (to this model) or when the tensors
        changed since :meth:`apply` (revert stacked deltas in LIFO order: newest first)."""
        state = self._state
        if state is None:
            raise DeltaStateError(f"this {self.method} delta is not applied; nothing to revert")
        if state.model() is not model:
            raise DeltaStateError(f"this {self.method} delta was applied to a different model object")
        params = {name: _get_param(model, name) for name in state.originals}
        for name, p in params.items():
            if tensor_fingerprint(p) != state.post_fingerprints[name]:
                raise DeltaStateError(
                    f"parameter {name!r} changed since this {self.method} delta was applied (another delta applied "
                    "on top?): revert in LIFO order (newest first)"
                )
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state.originals[name])
        self._state = None

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

    # -- persistence -------------------------------------------------------------------------------------------
    def save(self, directory: str | Path, *, include_originals: bool = False) -> Path:
        """Write ``edit_config.json`` and ``edit_delta.safetensors`` into ``directory`` (created if needed).

        With ``include_originals`` (the delta must be applied), the original tensors are written too
        (``edit_originals.safetensors``), so :meth:`revert_saved` can later undo the edit *bitwise* on a separately
        loaded edited checkpoint -- subtracting ΔW could not (see the module docstring).
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        if include_originals and self._state is None:
            raise DeltaStateError("include_originals=True needs an applied delta (the originals are kept by apply)")
        directory.mkdir(parents=True, exist_ok=True)
        if include_originals:
            assert self._state is not None
            save_file(
                {k: v.detach().to("cpu").contiguous().clone() for k, v in self._state.originals.items()},
                str(directory / ORIGINALS_NAME),
                metadata={"format": _FORMAT_TAG, "post_apply_fingerprints": json.dumps(self._state.post_fingerprints)},
            )
        elif (directory / ORIGINALS_NAME).exists():
            (directory / ORIGINALS_NAME).unlink()
        tensors: dict[str, torch.Tensor] = {}
        entries = []
        for u in self.updates:
            keys = []
            for suffix, t in u.tensors().items():
                key = f"{u.param}.{suffix}"
                tensors[key] = t.detach().to("cpu").contiguous().clone()
                keys.append(key)
            entries.append(
                {
                    "kind": u.kind,
                    "param": u.param,
                    "shape": list(u.shape),
                    "dtype": str(u.dtype).removeprefix("torch."),
                    "rank": u.rank,
                    "keys": keys,
                }
            )
        config = {
            "format": _FORMAT_TAG,
            "format_version": FORMAT_VERSION,
            "kedit_version": kedit_version(),
            "method": self.method,
            "config": self.config,
            "requests": self.requests,
            "meta": self.meta,
            "fingerprints": self.fingerprints,
            "updates": entries,
        }
        save_file(
            tensors,
            str(directory / WEIGHTS_NAME),
            metadata={"format": _FORMAT_TAG, "format_version": str(FORMAT_VERSION), "method": self.method},
        )
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> EditDelta:
        """Read a delta written by :meth:`save`, validating the format version and the tensors against the
        config (raises :class:`DeltaFormatError` naming the offending file)."""
        from safetensors import SafetensorError, safe_open

        directory = Path(directory)
        cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (cfg_path, w_path):
            if not path.is_file():
                raise DeltaFormatError(f"{path}: missing (is {directory} an edit delta directory?)")
        try:
            config = json.loads(cfg_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DeltaFormatError(f"{cfg_path}: not valid JSON ({e})") from e
        if not isinstance(config, dict) or config.get("format") != _FORMAT_TAG:
            raise DeltaFormatError(f"{cfg_path}: not a kedit edit-delta config (format != {_FORMAT_TAG!r})")
        version = config.get("format_version")
        if version != FORMAT_VERSION:
            raise DeltaFormatError(
                f"{cfg_path}: format_version {version!r} is not supported (this kedit reads {FORMAT_VERSION})"
            )
        try:
            with safe_open(str(w_path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise DeltaFormatError(f"{w_path}: cannot read safetensors file ({e})") from e
        if header.get("format") != _FORMAT_TAG or header.get("format_version") != str(FORMAT_VERSION):
            raise DeltaFormatError(
                f"{w_path}: metadata header says format {header.get('format')!r} version "
                f"{header.get('format_version')!r}; expected {_FORMAT_TAG!r} version {FORMAT_VERSION}"
            )
        updates: list[ParamUpdate] = []
        used: set[str] = set()
        try:
            entries = list(config["updates"])
            for e in entries:
                kind_cls = _KINDS.get(e["kind"])
                if kind_cls is None:
                    raise DeltaFormatError(f"{cfg_path}: unknown update kind {e['kind']!r}")
                param = e["param"]
                suffixes = ("a", "b") if kind_cls is LowRankUpdate else ("delta",)
                parts = {}
                for s in suffixes:
                    key = f"{param}.{s}"
                    if key not in tensors:
                        raise DeltaFormatError(f"{w_path}: missing tensor {key!r} listed in {CONFIG_NAME}")
                    parts[s] = tensors[key]
                    used.add(key)
                upd = kind_cls(param, **parts)  # type: ignore[call-arg]
                if list(upd.shape) != list(e["shape"]) or str(upd.dtype).removeprefix("torch.") != e["dtype"]:
                    raise DeltaFormatError(
                        f"{w_path}: tensors of {param!r} give shape {list(upd.shape)} / {upd.dtype}, but "
                        f"{CONFIG_NAME} says {e['shape']} / {e['dtype']}"
                    )
                updates.append(upd)
        except (KeyError, TypeError) as e:
            raise DeltaFormatError(f"{cfg_path}: malformed update list ({e!r})") from e
        except (ValueError, NonFiniteDeltaError) as e:
            if isinstance(e, DeltaFormatError):
                raise
            raise DeltaFormatError(f"{w_path}: invalid update tensors ({e})") from e
        extra = set(tensors) - used
        if extra:
            raise DeltaFormatError(f"{w_path}: tensors not listed in {CONFIG_NAME}: {sorted(extra)}")
        try:
            delta = cls(
                updates=updates,
                method=config.get("method", "unknown"),
                config=config.get("config", {}),
                requests=config.get("requests", []),
                meta=config.get("meta", {}),
                fingerprints=config.get("fingerprints", {}),
            )
        except (TypeError, ValueError) as e:
            raise DeltaFormatError(f"{cfg_path}: invalid delta ({e})") from e
        o_path = directory / ORIGINALS_NAME
        if o_path.is_file():
            try:
                with safe_open(str(o_path), framework="pt") as f:
                    post = json.loads((f.metadata() or {})["post_apply_fingerprints"])
                    originals = {k: f.get_tensor(k) for k in f.keys()}
            except (SafetensorError, OSError, ValueError, KeyError) as e:
                raise DeltaFormatError(f"{o_path}: cannot read the saved originals ({e})") from e
            if set(originals) != set(delta.params) or set(post) != set(delta.params):
                raise DeltaFormatError(f"{o_path}: originals do not match the updated parameters")
            delta._saved_originals, delta._saved_post = originals, post
        return delta

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
        params = {name: _get_param(model, name) for name in self._saved_originals}
        for name, p in params.items():
            if tensor_fingerprint(p) != self._saved_post[name]:
                raise FingerprintMismatchError(
                    f"parameter {name!r} is not in the state this {self.method} delta left it in (another model, or "
                    "another edit on top): revert in LIFO order"
                )
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self._saved_originals[name].to(device=p.device, dtype=p.dtype))


def load_delta(directory: str | Path) -> EditDelta:
    """Load an :class:`EditDelta` saved with :meth:`EditDelta.save`."""
    return EditDelta.load(directory)
