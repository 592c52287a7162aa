"""Update kinds: the change an :class:`~kedit.deltas.EditDelta` makes to one parameter.

All kinds are in the parameter's **storage** orientation; ``from_math`` converts from math orientation
``[out, in]`` via :func:`kedit.arch.is_transposed`, so GPT-2 ``Conv1D`` weights are handled here and in
``kedit.arch`` only:

* :class:`LowRankUpdate` ``ΔW = a @ b`` (``a: [rows, r]``, ``b: [r, cols]``) -- ROME is ``r = 1``.
* :class:`DenseUpdate` a full-shape ``ΔW``.
* :class:`MemoryEntryUpdate` no weight change at all: one entry of a side memory (GRACE's codebook,
  :mod:`kedit.memory`) keyed by an edit id; applying adds the entry to the model's memory, reverting removes it.

An update is a value: applying it (``W ← round(W + ΔW)``) and undoing it are :class:`~kedit.deltas.EditDelta`'s
job. ``dense(dtype, device)`` must be a deterministic function of the stored tensors -- exact rollback replays it
(see :mod:`kedit.deltas.ledger`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from kedit.deltas.errors import DeltaError, NonFiniteDeltaError

__all__ = ["KINDS", "DenseUpdate", "LowRankUpdate", "MemoryEntryUpdate", "ParamUpdate", "get_param"]


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


def get_param(model: nn.Module, name: str) -> nn.Parameter:
    try:
        return model.get_parameter(name)
    except AttributeError as e:
        raise DeltaError(
            f"model ({type(model).__name__}) has no parameter {name!r}: the delta was computed for another "
            "architecture"
        ) from e


# -- update kinds -------------------------------------------------------------------------------------------
@dataclass(eq=False)
class ParamUpdate:
    """Base class of a change to one parameter, in the parameter's storage orientation."""

    param: str
    kind: ClassVar[str] = ""
    #: names of the stored tensors (the keys of :meth:`tensors`, and the constructor's keyword arguments)
    parts: ClassVar[tuple[str, ...]] = ()
    #: true for side-memory entries (:class:`MemoryEntryUpdate`): nothing is added to a parameter
    is_memory: ClassVar[bool] = False

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

    @property
    def nbytes(self) -> int:
        """Bytes of the stored factors (``a`` and ``b``, or the dense ``ΔW``)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


@dataclass(eq=False)
class LowRankUpdate(ParamUpdate):
    """``ΔW_storage = a @ b`` with ``a: [rows, r]`` and ``b: [r, cols]`` in storage orientation.

    A rank-one ROME edit is ``r = 1``. Use :meth:`from_math` to build it from a math-orientation ``left @ right``.
    """

    a: torch.Tensor = field(default=None)  # type: ignore[assignment]
    b: torch.Tensor = field(default=None)  # type: ignore[assignment]
    kind: ClassVar[str] = "low_rank"
    parts: ClassVar[tuple[str, ...]] = ("a", "b")

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
        weight_shape = tuple(get_param(model, param_name).shape)
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
    parts: ClassVar[tuple[str, ...]] = ("delta",)

    def __post_init__(self) -> None:
        _check_finite(self.param, "delta", self.delta)

    @classmethod
    def from_math(cls, model: nn.Module, param_name: str, delta: torch.Tensor) -> DenseUpdate:
        """From a math-orientation ``[out, in]`` ``ΔW`` of a Linear/Conv1D weight."""
        from kedit.arch import to_storage

        module = _owning_module(model, param_name)
        upd = cls(param_name, to_storage(module, delta.detach()).contiguous())
        weight_shape = tuple(get_param(model, param_name).shape)
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


@dataclass(eq=False)
class MemoryEntryUpdate(ParamUpdate):
    """One entry of a side memory (:mod:`kedit.memory`): the weights are never changed.

    ``param`` is a unique name ``<module path>#<method>:<edit id>`` (not a parameter); ``key`` ``[d_in]`` and
    ``value`` ``[d_out]`` are the codebook entry, ``info`` the JSON part (``edit_id``, ``module``, ``label``,
    ``epsilon``, ``method``). :class:`~kedit.deltas.EditDelta` applies it by adding the entry to the model's memory
    (installed on first use) and reverts it by removing the entry by id (the memory is uninstalled with its last
    entry), so nothing goes through the rollback ledger's parameter chains.
    """

    key: torch.Tensor = field(default=None)  # type: ignore[assignment]
    value: torch.Tensor = field(default=None)  # type: ignore[assignment]
    info: dict = field(default_factory=dict)
    kind: ClassVar[str] = "memory_entry"
    parts: ClassVar[tuple[str, ...]] = ("key", "value")
    is_memory: ClassVar[bool] = True
    #: the ``info`` entries every memory entry carries
    INFO_KEYS: ClassVar[tuple[str, ...]] = ("edit_id", "module", "label", "epsilon", "method")

    def __post_init__(self) -> None:
        _check_finite(self.param, "key", self.key)
        _check_finite(self.param, "value", self.value)
        if self.key.ndim != 1 or self.value.ndim != 1:
            raise ValueError(
                f"memory entry {self.param!r}: key and value must be 1-D, got {tuple(self.key.shape)} and "
                f"{tuple(self.value.shape)}"
            )
        if not isinstance(self.info, dict):
            raise TypeError(f"memory entry {self.param!r}: info must be a dict, got {type(self.info).__name__}")
        missing = [k for k in self.INFO_KEYS if k not in self.info]
        if missing:
            raise ValueError(f"memory entry {self.param!r}: info lacks {missing}")
        eps = self.info["epsilon"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"memory entry {self.param!r}: epsilon must be a positive number, got {eps!r}")
        if not isinstance(self.info["edit_id"], str) or not self.info["edit_id"]:
            raise ValueError(f"memory entry {self.param!r}: edit_id must be a non-empty string")

    @property
    def edit_id(self) -> str:
        return str(self.info["edit_id"])

    @property
    def shape(self) -> tuple[int, ...]:
        return (int(self.key.shape[0]) + int(self.value.shape[0]),)

    @property
    def rank(self) -> int:
        return 1

    @property
    def dtype(self) -> torch.dtype:
        return self.value.dtype

    def dense(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> torch.Tensor:
        raise DeltaError(f"{self.param!r} is a memory entry, not a weight update: it has no dense ΔW")

    def norm(self) -> float:
        return float(torch.linalg.vector_norm(self.value.detach().double()).item())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"key": self.key, "value": self.value}


#: ``kind`` tag (as written in ``edit_config.json``) -> update class
KINDS: dict[str, type[ParamUpdate]] = {
    LowRankUpdate.kind: LowRankUpdate,
    DenseUpdate.kind: DenseUpdate,
    MemoryEntryUpdate.kind: MemoryEntryUpdate,
}
