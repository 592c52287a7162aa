"""WISE's side memory at one layer (Wang et al., "WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of
Large Language Models", NeurIPS 2024).

The *main memory* is the model's own MLP output projection ``W`` (kedit.arch slot ``mlp_out``, math orientation
``[d_out, d_in]``), never changed. The *side memory* is a copy ``W' = W + ΔW`` of it, applied through a forward
hook: a row routed to the side memory gets ``y + A ΔWᵀ`` (``A`` = the projection's input, the FFN's intermediate
activation; ``y = A Wᵀ`` the module's own output); a row routed to the main memory gets the module's output
tensor, untouched (bitwise the unedited model).

Router
------
The activation score of a row is ``Δ_act(x) = mean_t ‖a_t ΔWᵀ‖₂`` over the row's real tokens (the attention mask
excludes padding, so a row scores the same alone or in a padded batch). A row goes to the side memory iff
``Δ_act(x) > ε`` with ``ε = min_i act_ratio_i · Δ_act(x_i)`` over the live edits' own inputs ``x_i`` (their
stored activations, re-scored under the current, merged ``ΔW``). The decision is made when a sequence starts (no
KV cache yet: a prefill or a teacher-forced forward) and kept for its KV-cached decode steps, so a generated
continuation is produced by the memory its prompt chose. A forward pre-hook on the root model reads the attention
mask and the cache length for this (greedy decoding and padded batches; beam search reordering rows is not
supported).

State
-----
One :class:`~kedit.memory.codebook.Record` per edit (its *knowledge shard*): ``value`` holds the shard's trained
entries of ``ΔW`` on its random mask (``round(mask_ratio · d_out · d_in)`` flat indices, regenerated from
``info["mask_seed"]`` by :func:`shard_mask`); ``key`` the edit's activations ``A(x)`` at its teacher-forced
prompt ⊕ target tokens (``info["n_tokens"]`` rows, the first ``info["n_prompt"]`` of them the prompt's), used to
set ``ε``. ``ΔW`` is the TIES merge (:func:`ties_merge`) of the live shards, recomputed from the records after every
add or removal -- so removing an edit gives exactly the memory of the remaining edits alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kedit.memory.codebook import Record
from kedit.memory.sequence import ForwardContext

__all__ = ["SideMemory", "activation_score", "shard_mask", "ties_merge", "trim"]

#: the ``info`` entries a WISE record carries beside the common ones
WISE_INFO = ("mask_seed", "mask_ratio", "n_tokens", "n_prompt", "act_ratio", "density")


def shard_mask(seed: int, numel: int, ratio: float) -> torch.Tensor:
    """Sorted flat indices (int64, CPU) of a random mask keeping ``max(1, round(ratio · numel))`` of ``numel``
    entries, drawn from a CPU generator seeded with ``seed`` (the same on every machine)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"mask ratio must be in (0, 1], got {ratio}")
    m = max(1, min(numel, round(ratio * numel)))
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randperm(numel, generator=g)[:m].sort().values


def trim(values: torch.Tensor, density: float) -> torch.Tensor:
    """TIES *trim*: keep the ``ceil(density · n)`` largest-magnitude entries of ``values`` (ties broken by position,
    earlier first), zero the rest."""
    if density >= 1.0:
        return values.clone()
    k = max(1, math.ceil(density * values.numel()))
    order = torch.sort(values.abs(), descending=True, stable=True).indices
    out = torch.zeros_like(values)
    out[order[:k]] = values[order[:k]]
    return out


def ties_merge(shards: Sequence[tuple[torch.Tensor, torch.Tensor]], numel: int, density: float = 1.0) -> torch.Tensor:
    """Merge sparse task vectors ``(flat indices, values)`` into one flat ``[numel]`` vector with TIES-Merging
    (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023): *trim* each to its
    top-``density`` magnitudes, *elect* the sign ``γ = sign(Σ_t τ̂_t)`` per entry, *disjoint merge*: the mean of the
    non-zero ``τ̂_t`` whose sign is ``γ``. One shard is returned as it is (nothing to resolve). CPU, in the values'
    dtype, summed in shard order (deterministic)."""
    if not shards:
        raise ValueError("ties_merge needs at least one shard")
    dtype = shards[0][1].dtype
    if len(shards) == 1:
        idx, val = shards[0]
        return torch.zeros(numel, dtype=dtype).index_put_((idx.cpu(),), val.cpu())
    trimmed = [(i.cpu(), trim(v.cpu(), density)) for i, v in shards]
    total = torch.zeros(numel, dtype=dtype)
    for i, v in trimmed:
        total.index_add_(0, i, v)
    sign = torch.sign(total)
    agree = torch.zeros(numel, dtype=dtype)
    count = torch.zeros(numel, dtype=dtype)
    for i, v in trimmed:
        ok = (v != 0) & (torch.sign(v) == sign[i])
        agree.index_add_(0, i[ok], v[ok])
        count.index_add_(0, i[ok], torch.ones(int(ok.sum()), dtype=dtype))
    return torch.where(count > 0, agree / count.clamp_min(1), torch.zeros((), dtype=dtype))


def activation_score(acts: torch.Tensor, delta: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
    """``Δ_act = mean_t ‖a_t ΔWᵀ‖₂`` over the last-but-one axis of ``acts [..., T, d_in]`` (``delta [d_out, d_in]``),
    counting only positions where ``real`` (``[..., T]``, 0/1) is set. Differentiable in ``delta``."""
    per_tok = torch.linalg.vector_norm(acts @ delta.T, dim=-1)
    if real is None:
        return per_tok.mean(dim=-1)
    real = real.to(per_tok.dtype)
    return (per_tok * real).sum(dim=-1) / real.sum(dim=-1).clamp_min(1)


class _Hook:
    """The layer hook (a callable object, so the memory is not captured in a closure)."""

    def __init__(self, mem: SideMemory) -> None:
        self.mem = mem

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        return self.mem.route(args[0], output)


class SideMemory:
    """WISE's side memory on one module: the per-edit shards, their TIES merge ``ΔW`` and the router threshold
    (see the module docstring). Duck-types :class:`~kedit.memory.codebook.Codebook`'s state interface, so
    :mod:`kedit.memory` adds, removes, snapshots, saves and loads it the same way."""

    kind = "wise"

    def __init__(self, module_path: str, d_in: int, d_out: int) -> None:
        self.module_path = module_path
        self.d_in, self.d_out = d_in, d_out
        self.records: dict[str, Record] = {}
        self.delta: torch.Tensor | None = None  # [d_out, d_in], compute dtype, on the layer's device
        self.threshold: float = math.inf
        self.handle: Any = None
        self._root_handles: list[Any] = []
        self._masks: dict[str, torch.Tensor] = {}
        self._ctx: tuple[torch.Tensor | None, int] | None = None
        self._route: torch.Tensor | None = None
        #: per-row scores and decisions of the last sequence start (for inspection and tests)
        self.last_scores: torch.Tensor | None = None
        self.last_route: torch.Tensor | None = None

    # -- records ------------------------------------------------------------------------------------------------
    @staticmethod
    def check(r: Record, d_in: int, d_out: int, path: str) -> None:
        """Refuse a record that does not fit a ``d_in → d_out`` module (raises ``ValueError`` naming it)."""
        info = r.info or {}
        missing = [k for k in WISE_INFO if k not in info]
        if missing:
            raise ValueError(f"edit {r.edit_id!r}: WISE record lacks {missing}")
        n_tok, n_prompt = int(info["n_tokens"]), int(info["n_prompt"])
        m = shard_mask(0, d_in * d_out, float(info["mask_ratio"])).numel()
        if (r.key.ndim != 1 or r.key.numel() != n_tok * d_in or not 0 < n_prompt <= n_tok
                or r.value.ndim != 1 or r.value.numel() != m):
            raise ValueError(
                f"edit {r.edit_id!r}: activations {tuple(r.key.shape)} / shard {tuple(r.value.shape)} do not fit "
                f"{path!r} (input {d_in}, output {d_out}, {n_tok} token(s), mask of {m}): made for another model")

    def __len__(self) -> int:
        return len(self.records)

    def snapshot(self) -> tuple:
        return (dict(self.records),)

    def restore(self, snap: tuple) -> None:
        self.records = dict(snap[0])
        self._materialise()

    def add(self, records: Sequence[Record]) -> None:
        for r in records:
            self.records[r.edit_id] = r
        self._materialise()

    def remove(self, ids: Sequence[str]) -> None:
        for i in ids:
            del self.records[i]
            self._masks.pop(i, None)
        self._materialise()

    def mask_of(self, r: Record) -> torch.Tensor:
        if r.edit_id not in self._masks:
            info = r.info or {}
            self._masks[r.edit_id] = shard_mask(int(info["mask_seed"]), self.d_in * self.d_out,
                                                float(info["mask_ratio"]))
        return self._masks[r.edit_id]

    def _materialise(self) -> None:
        recs = list(self.records.values())
        if not recs:
            self.delta, self.threshold, self._route = None, math.inf, None
            return
        first = recs[0]
        density = float((first.info or {})["density"])
        flat = ties_merge([(self.mask_of(r), r.value) for r in recs], self.d_in * self.d_out, density)
        self.delta = flat.view(self.d_out, self.d_in).to(first.value.device)
        thr = math.inf
        for r in recs:
            info = r.info or {}
            acts = r.key.view(int(info["n_tokens"]), self.d_in)
            s_full = float(activation_score(acts, self.delta))
            s_prompt = float(activation_score(acts[: int(info["n_prompt"])], self.delta))
            thr = min(thr, float(info["act_ratio"]) * min(s_full, s_prompt))
        self.threshold = thr

    def scores(self, acts: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        """Router scores of ``acts [B, T, d_in]`` (the module's inputs) under the current ``ΔW``."""
        if self.delta is None:
            return torch.zeros(acts.shape[0])
        a = acts.to(device=self.delta.device, dtype=self.delta.dtype)
        return activation_score(a, self.delta, None if real is None else real.to(self.delta.device))

    # -- routing ------------------------------------------------------------------------------------------------
    def route(self, x: torch.Tensor, output: Any) -> Any:
        if self.delta is None or not isinstance(output, torch.Tensor) or x.ndim < 2:
            return None
        x3 = x if x.ndim == 3 else x.unsqueeze(0)
        b, t = x3.shape[0], x3.shape[1]
        mask, past = self._ctx if self._ctx is not None else (None, 0)
        real = None
        if mask is not None and mask.ndim == 2 and mask.shape[0] == b and mask.shape[1] >= t:
            real = mask[:, -t:]
        a = x3.to(device=self.delta.device, dtype=self.delta.dtype)
        side = a @ self.delta.T
        if past > 0 and self._route is not None and self._route.numel() == b:
            go = self._route
        else:
            per_tok = torch.linalg.vector_norm(side, dim=-1)
            if real is None:
                score = per_tok.mean(dim=-1)
            else:
                r = real.to(device=per_tok.device, dtype=per_tok.dtype)
                score = (per_tok * r).sum(dim=-1) / r.sum(dim=-1).clamp_min(1)
            go = score > self.threshold
            self.last_scores, self.last_route = score.detach(), go
            if past == 0:
                self._route = go
        if not bool(go.any()):
            return None  # the main memory: the module's own output, untouched
        out3 = output if output.ndim == 3 else output.unsqueeze(0)
        new = out3.clone()
        rows = go.to(new.device)
        new[rows] = (out3[rows].to(side.dtype) + side[go].to(new.device)).to(new.dtype)
        return new.view_as(output)

    # -- installation -------------------------------------------------------------------------------------------
    def install(self, module: nn.Module, root: nn.Module | None = None) -> None:
        if self.handle is None:
            self.handle = module.register_forward_hook(_Hook(self))
            if root is not None and root is not module:
                self._root_handles = ForwardContext(self).install(root)

    def uninstall(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        for h in self._root_handles:
            h.remove()
        self._root_handles = []
        self._ctx = self._route = None
