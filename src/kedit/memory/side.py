"""WISE's side memories at one layer (Wang et al., "WISE: Rethinking the Knowledge Memory for Lifelong Model Editing
of Large Language Models", NeurIPS 2024).

The *main memory* is the model's own MLP output projection ``W`` (kedit.arch slot ``mlp_out``, math orientation
``[d_out, d_in]``), never changed. A *side memory* ``m`` is a copy ``W + ΔW_m`` of it, applied through a forward
hook: a row routed to side memory ``m`` gets ``y + A ΔW_mᵀ`` (``A`` = the projection's input, the FFN's
intermediate activation; ``y = A Wᵀ`` the module's own output); a row routed to the main memory gets the module's
output tensor, untouched (bitwise the unedited model).

Side memories and shards
------------------------
Edits fill side memory ``m`` up to a capacity (``WISEConfig.edits_per_memory``); then a new side memory opens (the
paper's WISE-Retrieve). An edit whose subject already has an edit in a memory goes to that memory (a re-edit
is trained where its old value lives). Inside a memory the edits are dealt round-robin to ``n_shards`` *knowledge
shards*, each with its own random mask ``M_{m,s}`` (seeded by the config seed, ``m`` and ``s``). An edit's record
holds its *residual*: the entries of ``M_{m,s}`` it added, trained on top of the live memory. A shard's task vector
is the sum of its residuals, ``τ_{m,s} = Σ_i r_i`` (in edit order), and ``ΔW_m = TIES(τ_{m,1} … τ_{m,S})``
(:func:`ties_dense`). The edit is trained *through* that merge, so the memory right after an edit is exactly the
one its loss saw.

Router
------
``Δ_act_m(x) = mean_t ‖a_t ΔW_mᵀ‖₂`` over the row's real tokens (the attention mask excludes padding, so a row
scores the same alone or in a padded batch); with ``WISEConfig.router_pool="max"`` (a kedit option, saved with
each record) the maximum over those tokens instead, everywhere a score is taken (router, thresholds, margins).
``ε_m = act_ratio · min_i min(Δ_act_m(p_i), Δ_act_m(p_i ⊕ t_i))`` over the edits ``i`` of memory ``m`` (their
stored activations, re-scored under the current ``ΔW_m``). A row is retrieved by the memory with the highest score
``m* = argmax_m Δ_act_m(x)`` (the paper's WISE-Retrieve) and goes to it if ``Δ_act_m*(x) > ε_m*``, else to the main
memory. The decision is made when a sequence starts (no KV cache yet: a prefill or a teacher-forced forward) and kept for its KV-cached decode
steps; a forward pre-hook on the root model reads the attention mask and the cache length for this (greedy decoding
and padded batches; beam search reordering rows is not supported).

State
-----
One :class:`~kedit.memory.codebook.Record` per edit: ``value`` = its residual on ``M_{m,s}``
(``round(mask_ratio · d_out · d_in)`` flat indices, regenerated from ``info["mask_seed"]`` by :func:`shard_mask`);
``key`` = the edit's activations ``A(x)`` at its teacher-forced prompt ⊕ target tokens (``info["n_tokens"]`` rows,
the first ``info["n_prompt"]`` the prompt's; ``info["tokens"]`` their ids, for replay when later edits of the same
memory are trained). Everything derived (``τ``, ``ΔW_m``, ``ε_m``) is recomputed from the records of the memories
an add or a removal touches, so a memory is a function of its records.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from kedit.memory.codebook import Record
from kedit.memory.sequence import ForwardContext

__all__ = ["POOLS", "MemoryState", "SideMemory", "activation_score", "pool_tokens", "shard_mask", "ties_dense",
           "ties_merge", "trim"]

#: the ``info`` entries a WISE record carries beside the common ones
WISE_INFO = ("mask_seed", "mask_ratio", "n_tokens", "n_prompt", "act_ratio", "density", "memory", "shard", "tokens")


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


def ties_dense(tau: torch.Tensor, density: float = 1.0, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """TIES-Merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023) of the
    rows of ``tau [S, n]``: *trim* each row to the entries at least as large in magnitude as its
    ``ceil(density · sizes[s])``-th largest (``sizes`` = the number of entries the row may hold, its mask size;
    default ``n``; ties at that magnitude are kept, so a row of zeros keeps everything and an edit trained through
    the merge starting from zero gets a gradient on its whole mask), *elect* the sign ``γ = sign(Σ_s τ̂_s)`` per
    entry, *disjoint merge*: the mean of the non-zero ``τ̂_s`` whose sign is ``γ``. One row is returned as it is."""
    if tau.ndim != 2 or tau.shape[0] < 1:
        raise ValueError(f"ties_dense needs [S ≥ 1, n] task vectors, got {tuple(tau.shape)}")
    if tau.shape[0] == 1:
        return tau[0]
    if density < 1.0:
        mag = tau.detach().abs()
        thr = torch.stack([torch.topk(mag[s], max(1, math.ceil(density * (sizes[s] if sizes is not None
                                                                         else tau.shape[1]))), sorted=False)
                           .values.min() for s in range(tau.shape[0])])
        tau = torch.where(mag >= thr.unsqueeze(1), tau, torch.zeros((), dtype=tau.dtype, device=tau.device))
    with torch.no_grad():
        sign = torch.sign(tau.sum(0))
        agree = (tau != 0) & (torch.sign(tau) == sign)
        count = agree.sum(0)
    merged = torch.where(agree, tau, torch.zeros((), dtype=tau.dtype, device=tau.device)).sum(0)
    return torch.where(count > 0, merged / count.clamp_min(1), torch.zeros((), dtype=tau.dtype, device=tau.device))


def ties_merge(shards: Sequence[tuple[torch.Tensor, torch.Tensor]], numel: int, density: float = 1.0) -> torch.Tensor:
    """:func:`ties_dense` of sparse task vectors ``(flat indices, values)`` over ``numel`` entries (each trimmed
    relative to its own number of entries). CPU, in the values' dtype."""
    if not shards:
        raise ValueError("ties_merge needs at least one shard")
    dtype = shards[0][1].dtype
    tau = torch.zeros(len(shards), numel, dtype=dtype)
    for s, (i, v) in enumerate(shards):
        tau[s].index_put_((i.cpu(),), v.cpu())
    return ties_dense(tau, density, [int(i.numel()) for i, _ in shards])


#: how a row's per-token scores ``‖a_t ΔW_mᵀ‖₂`` are pooled into ``Δ_act_m``
POOLS = ("mean", "max")


def pool_tokens(per_tok: torch.Tensor, real: torch.Tensor | None = None, pool: str = "mean") -> torch.Tensor:
    """Pool per-token scores ``[..., T]`` (all ≥ 0) over the last axis, counting only positions where ``real``
    (``[..., T]``, 0/1) is set: their mean, or their maximum (``pool="max"``; a row without real tokens scores 0
    either way)."""
    if pool == "max":
        if real is not None:
            per_tok = per_tok * real.to(per_tok.dtype)  # scores are ≥ 0: a zeroed pad never raises the maximum
        return per_tok.amax(dim=-1) if per_tok.shape[-1] else per_tok.sum(dim=-1)
    if pool != "mean":
        raise ValueError(f"router pool must be one of {POOLS}, got {pool!r}")
    if real is None:
        return per_tok.mean(dim=-1)
    real = real.to(per_tok.dtype)
    return (per_tok * real).sum(dim=-1) / real.sum(dim=-1).clamp_min(1)


def activation_score(acts: torch.Tensor, delta: torch.Tensor, real: torch.Tensor | None = None,
                     pool: str = "mean") -> torch.Tensor:
    """``Δ_act = pool_t ‖a_t ΔWᵀ‖₂`` over the last-but-one axis of ``acts [..., T, d_in]`` (``delta [d_out, d_in]``),
    counting only positions where ``real`` (``[..., T]``, 0/1) is set (:func:`pool_tokens`: the mean by default,
    the paper's score; or the maximum). Differentiable in ``delta``."""
    return pool_tokens(torch.linalg.vector_norm(acts @ delta.T, dim=-1), real, pool)


class MemoryState:
    """The records of WISE's side memories on one ``d_in → d_out`` module and what they determine: per memory the
    shard task vectors ``τ`` ``[S, d_out·d_in]``, ``ΔW_m`` ``[d_out, d_in]`` and ``ε_m`` (see the module
    docstring). No hooks: :meth:`copy` gives a planning copy that an edit's computation extends without touching
    the model."""

    def __init__(self, module_path: str, d_in: int, d_out: int) -> None:
        self.module_path = module_path
        self.d_in, self.d_out = d_in, d_out
        self.records: dict[str, Record] = {}
        self.members: dict[int, list[str]] = {}  # memory -> its edit ids, in edit order
        self.tau: dict[int, torch.Tensor] = {}
        self.deltas: dict[int, torch.Tensor] = {}
        self.eps: dict[int, float] = {}
        self._masks: dict[tuple[int, int], torch.Tensor] = {}
        self._stack: tuple[list[int], torch.Tensor, torch.Tensor] | None = None
        #: the two-stage router's stage-1 data (bf16 ``ΔWᵀ`` stack, ``‖|ΔW_m|‖₂``), built with :meth:`stack`'s order
        self._bounds: tuple[torch.Tensor, torch.Tensor] | None = None
        self._abs_norm: dict[int, float] = {}  # memory -> ‖|ΔW_m|‖₂ (spectral norm of the entrywise magnitude)
        #: ``[B, M]`` of the last two-stage :meth:`ratios` call: the memories scored exactly per row (stack order)
        self.last_candidates: torch.Tensor | None = None
        #: how the router pools a row's token scores (:func:`pool_tokens`): the records' ``info["pool"]`` (all the
        #: same; records saved before the option existed: ``"mean"``)
        self.pool = "mean"

    # -- records ------------------------------------------------------------------------------------------------
    @staticmethod
    def check(r: Record, d_in: int, d_out: int, path: str) -> None:
        """Refuse a record that does not fit a ``d_in → d_out`` module (raises ``ValueError`` naming it)."""
        info = r.info or {}
        missing = [k for k in WISE_INFO if k not in info]
        if missing:
            raise ValueError(f"edit {r.edit_id!r}: WISE record lacks {missing}")
        if info.get("pool", "mean") not in POOLS:
            raise ValueError(f"edit {r.edit_id!r}: unknown router pool {info['pool']!r} (known: {', '.join(POOLS)})")
        n_tok, n_prompt = int(info["n_tokens"]), int(info["n_prompt"])
        m = shard_mask(0, d_in * d_out, float(info["mask_ratio"])).numel()
        if (r.key.ndim != 1 or r.key.numel() != n_tok * d_in or not 0 < n_prompt <= n_tok
                or r.value.ndim != 1 or r.value.numel() != m or len(info["tokens"]) != n_tok + 1
                or int(info["memory"]) < 0 or int(info["shard"]) < 0):
            raise ValueError(
                f"edit {r.edit_id!r}: activations {tuple(r.key.shape)} / shard {tuple(r.value.shape)} do not fit "
                f"{path!r} (input {d_in}, output {d_out}, {n_tok} token(s), mask of {m}): made for another model")

    def __len__(self) -> int:
        return len(self.records)

    def copy(self) -> MemoryState:
        """A planning copy: the same records and derived tensors (shared, never modified in place), own dicts."""
        c = MemoryState(self.module_path, self.d_in, self.d_out)
        c.records = dict(self.records)
        c.members = {m: list(v) for m, v in self.members.items()}
        c.tau, c.deltas, c.eps = dict(self.tau), dict(self.deltas), dict(self.eps)
        c._masks = dict(self._masks)
        c._abs_norm = dict(self._abs_norm)
        c.pool = self.pool
        return c

    def snapshot(self) -> tuple:
        return (dict(self.records),)

    def restore(self, snap: tuple) -> None:
        self.records = dict(snap[0])
        self.members = {}
        for i, r in self.records.items():
            self.members.setdefault(int(r.info["memory"]), []).append(i)
        self._materialise(set(self.members) | set(self.deltas))

    def add(self, records: Sequence[Record]) -> None:
        """Add records (all with the router pool of the live ones: one router scores every memory; refused, with
        the state unchanged, otherwise)."""
        live = self.pool if self.records else None
        for r in records:
            p = (r.info or {}).get("pool", "mean")
            if live is None:
                live = p
            elif p != live:
                raise ValueError(f"edit {r.edit_id!r}: router pool {p!r} differs from the memory's {live!r} (one "
                                 "router scores every side memory of a layer: edit with the same pool)")
        touched = set()
        for r in records:
            m = int(r.info["memory"])
            self.records[r.edit_id] = r
            self.members.setdefault(m, []).append(r.edit_id)
            touched.add(m)
        self._materialise(touched)

    def remove(self, ids: Sequence[str]) -> None:
        touched = set()
        for i in ids:
            m = int(self.records.pop(i).info["memory"])
            self.members[m].remove(i)
            touched.add(m)
        self._materialise(touched)

    def memory_of(self, edit_id: str) -> int:
        return int(self.records[edit_id].info["memory"])

    def mask(self, m: int, s: int, seed: int, ratio: float) -> torch.Tensor:
        """The mask of shard ``s`` of memory ``m`` (the one its records were trained on, else a new one from
        ``seed`` and ``ratio``), on the CPU."""
        if (m, s) not in self._masks:
            for i in self.members.get(m, []):
                info = self.records[i].info
                if int(info["shard"]) == s:
                    seed, ratio = int(info["mask_seed"]), float(info["mask_ratio"])
                    break
            return shard_mask(seed, self.d_in * self.d_out, ratio)
        return self._masks[(m, s)]

    def shard_tau(self, m: int, n_rows: int = 0) -> tuple[torch.Tensor | None, list[int], float]:
        """``(τ [S, d_out·d_in] or None, mask sizes, density)`` of memory ``m``, with at least ``n_rows`` rows
        (zero rows for shards without records)."""
        ids = self.members.get(m, [])
        if not ids and not n_rows:
            return None, [], 1.0
        recs = [self.records[i] for i in ids]
        rows = max([int(r.info["shard"]) + 1 for r in recs] + [n_rows])
        first = recs[0] if recs else None
        dev = first.value.device if first is not None else torch.device("cpu")
        dt = first.value.dtype if first is not None else torch.float32
        if m in self.tau and self.tau[m].shape[0] >= rows:
            tau = self.tau[m]
        else:
            tau = torch.zeros(rows, self.d_in * self.d_out, dtype=dt, device=dev)
            for r in recs:
                s = int(r.info["shard"])
                key = (m, s)
                if key not in self._masks:
                    self._masks[key] = shard_mask(int(r.info["mask_seed"]), self.d_in * self.d_out,
                                                  float(r.info["mask_ratio"]))
                tau[s].index_add_(0, self._masks[key].to(dev), r.value)
        sizes = []
        for s in range(tau.shape[0]):
            mk = self._masks.get((m, s))
            sizes.append(int(mk.numel()) if mk is not None else self.d_in * self.d_out)
        density = float(first.info["density"]) if first is not None else 1.0
        return tau, sizes, density

    def _materialise(self, touched: Iterable[int]) -> None:
        touched = list(touched)
        first = next(iter(self.records.values()), None)
        self.pool = (first.info or {}).get("pool", "mean") if first is not None else "mean"
        for m in touched:
            self.tau.pop(m, None)
            ids = self.members.get(m, [])
            if not ids:
                self.members.pop(m, None)
                self.deltas.pop(m, None)
                self.eps.pop(m, None)
                continue
            tau, sizes, density = self.shard_tau(m)
            self.tau[m] = tau
            delta = ties_dense(tau, density, sizes).view(self.d_out, self.d_in)
            self.deltas[m] = delta
            self.eps[m] = min(self.edit_score(self.records[i], delta) for i in ids)
        for m in touched:
            self._abs_norm.pop(m, None)
        self._stack = self._bounds = None

    def edit_score(self, r: Record, delta: torch.Tensor) -> float:
        """``act_ratio · min(Δ_act(prompt), Δ_act(prompt ⊕ target))`` of an edit's stored activations."""
        info = r.info
        acts = r.key.view(int(info["n_tokens"]), self.d_in)
        s_full = float(activation_score(acts, delta, pool=self.pool))
        s_prompt = float(activation_score(acts[: int(info["n_prompt"])], delta, pool=self.pool))
        return float(info["act_ratio"]) * min(s_full, s_prompt)

    def stack(self) -> tuple[list[int], torch.Tensor, torch.Tensor] | None:
        """``(memory ids, ΔWᵀ [d_in, M · d_out], ε [M])`` of the live memories (columns ``j · d_out …`` are memory
        ``ids[j]``'s ``ΔW_jᵀ``, contiguous: the router's one product), or ``None`` without any. Built on first use
        after a change of the memories (:meth:`_materialise` drops it: add, remove, restore, load)."""
        if self._stack is None and self.deltas:
            order = sorted(self.deltas)
            first = self.deltas[order[0]]
            dt = torch.empty(self.d_in, len(order) * self.d_out, dtype=first.dtype, device=first.device)
            for j, m in enumerate(order):
                dt[:, j * self.d_out:(j + 1) * self.d_out].copy_(self.deltas[m].T)
            eps = torch.tensor([self.eps[m] for m in order], dtype=first.dtype, device=first.device)
            self._stack = (order, dt, eps)
        return self._stack

    def _token_scores(self, a: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        """``‖a_t ΔW_mᵀ‖₂`` ``[n, M]`` of token activations ``a [n, d_in]``: one ``[n, d_in] × [d_in, M · d_out]``
        product against the stacked transposes."""
        return torch.linalg.vector_norm((a @ dt).view(a.shape[0], -1, self.d_out), dim=-1)

    @property
    def bounded(self) -> bool:
        """Whether the router prunes with the bf16 bounds (:meth:`ratios`): every live record was made with
        ``router="bounded"`` (a memory saved before the setting existed, or with ``"exact"``, scores exactly)."""
        return bool(self.records) and all((r.info or {}).get("router") == "bounded" for r in self.records.values())

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(ΔWᵀ stack in bfloat16, ‖|ΔW_m|‖₂ [M] in float32)`` in :meth:`stack`'s order: stage 1 of the two-stage
        router. ``‖|ΔW_m|‖₂`` (the spectral norm of the entrywise magnitudes, float64 SVD, rounded up by 1e-6
        relative) is kept per memory until an add or removal touches it, so rebuilding after an edit redoes one."""
        st = self.stack()
        if st is None:
            return None
        if self._bounds is None:
            order, dt, _ = st
            for m in order:
                if m not in self._abs_norm:
                    n = torch.linalg.matrix_norm(self.deltas[m].detach().abs().double(), ord=2)
                    self._abs_norm[m] = float(n) * (1 + 1e-6)
            norms = torch.tensor([self._abs_norm[m] for m in order], dtype=torch.float32, device=dt.device)
            self._bounds = (dt.detach().to(torch.bfloat16), norms)
        return self._bounds

    def ratios(self, acts: torch.Tensor, real: torch.Tensor | None = None, *, bounded: bool | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ratio [B], memory id [B])`` of ``acts [B, T, d_in]``: the memory ``m* = argmax_m Δ_act_m`` and its
        ``Δ_act_m* / ε_m*``; ids are ``-1`` without memories.

        Only the real tokens (``real`` set) are scored; padded positions get 0 and the token mean is the one of
        :func:`_reference_ratios` (the per-memory einsum over every position), term for term.

        ``bounded`` (default :attr:`bounded`, and only on the CPU, where bf16 products accumulate in float32):
        the same decision and ratio from fewer exact scores (:meth:`_bounded_ratios`); else every memory is scored
        exactly in one ``[n, d_in] × [d_in, M · d_out]`` product."""
        st = self.stack()
        if st is None:
            return torch.zeros(acts.shape[0]), torch.full((acts.shape[0],), -1, dtype=torch.long)
        order, dt, eps = st
        if bounded is None:
            bounded = self.bounded
        a = acts.to(device=dt.device, dtype=dt.dtype)
        b, t = a.shape[0], a.shape[1]
        if bounded and dt.device.type == "cpu":
            sel = (torch.ones(b, t, dtype=torch.bool, device=dt.device) if real is None
                   else real.to(dt.device) != 0)
            return self._bounded_ratios(a, sel, st)
        if real is None:
            score = pool_tokens(self._token_scores(a.reshape(b * t, -1), dt).view(b, t, -1).transpose(1, 2),
                                None, self.pool)
        else:
            r = real.to(device=dt.device, dtype=dt.dtype)
            sel = r != 0
            per_tok = torch.zeros(b, t, len(order), dtype=dt.dtype, device=dt.device)
            per_tok[sel] = self._token_scores(a[sel], dt)
            score = pool_tokens(per_tok.transpose(1, 2), r.unsqueeze(1), self.pool)
        where = score.argmax(dim=1)  # the memory whose activation score is highest (the paper's retrieval) ...
        best = (score / eps).gather(1, where.unsqueeze(1)).squeeze(1)  # ... answers if above its own threshold
        ids = torch.tensor(order, device=where.device)[where]
        return best, ids

    def token_bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lower, upper)`` ``[n, M]`` float32 bounds on the exact ``‖x_t ΔW_mᵀ‖₂`` of tokens ``x [n, d_in]``
        (stage 1 of :meth:`_bounded_ratios`, which derives them), from one bfloat16 product."""
        dtb, abs_norm = self.bounds()
        n_mem = abs_norm.numel()
        y = (x.to(torch.bfloat16) @ dtb).view(x.shape[0], n_mem, self.d_out)
        approx = torch.linalg.vector_norm(y, dim=-1).float()  # [n, M]: ‖ỹ‖ (float32 sum, rounded to bf16)
        u = 2.0 ** -8
        un = u + 1e-4  # the norm's own rounding to bf16 (and its float32 sum)
        gamma = self.d_in * 2.0 ** -24 / (1 - self.d_in * 2.0 ** -24)
        c = (2 * u + u * u + gamma * (1 + u) ** 2) * 1.001
        a_norm = torch.linalg.vector_norm(x.float(), dim=-1, keepdim=True)
        err = c * abs_norm.unsqueeze(0) * a_norm + 1e-30
        up, down = approx / ((1 - un) * (1 - u)), approx / ((1 + un) * (1 + u))
        return (down - err).clamp_min(0), up + err

    def _bounded_ratios(self, a: torch.Tensor, sel: torch.Tensor, st: tuple[list[int], torch.Tensor, torch.Tensor]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The router of :meth:`ratios` in two stages, with the exact router's decision and ratio.

        **Stage 1 (bounds, :meth:`token_bounds`).** One bfloat16 product ``ỹ = bf16(a) · bf16(ΔWᵀ)`` of the
        real tokens against every memory (float32 accumulation, the result rounded to bf16; about 4 × faster than
        the float32 product on the 2 shared AVX-512-BF16 cores). With ``u = 2⁻⁸`` (bf16's unit roundoff) and
        ``γ = n·2⁻²⁴ / (1 − n·2⁻²⁴)`` (``n = d_in``; float32 accumulation in any order), elementwise: rounding the
        inputs moves the product by at most ``(2u + u²)|a||ΔW|ᵀ``, accumulating by ``γ(1 + u)²|a||ΔW|ᵀ``, so the
        float32 sums ``ŷ`` satisfy ``|‖ŷ‖ − s| ≤ c ‖|a||ΔW_m|ᵀ‖ ≤ c ‖|ΔW_m|‖₂ ‖a‖`` (``s = ‖a ΔW_mᵀ‖`` exact,
        ``c = 2u + u² + γ(1 + u)²``); rounding ``ŷ`` to bf16 (``ỹ``) and the norm to bf16 (``N̂``, a float32 sum)
        each change it by a factor in ``[1/(1 + u), 1/(1 − u)]`` (``u + 10⁻⁴`` for the norm). Hence, per token and
        memory, ``N̂/((1 + u')(1 + u)) − c‖|ΔW_m|‖₂‖a‖ ≤ s ≤ N̂/((1 − u')(1 − u)) + c‖|ΔW_m|‖₂‖a‖`` (``c`` taken
        0.1 % larger for the float32 ``‖a‖`` and ``‖|ΔW_m|‖₂`` 10⁻⁶ larger). Their means over the row's real
        tokens bound ``Δ_act_m``: ``L_m ≤ Δ_act_m ≤ U_m``.

        **Stage 2 (exact).** Memory ``m`` can be the argmax only if ``U_m ≥ Δ_act_m* ≥ L_m* ≥ max_j L_j``; every
        other memory has ``Δ_act_m ≤ U_m < max_j L_j ≤ Δ_act_m*`` and cannot win. So the exact scores (float32, the
        same product per memory as :meth:`_token_scores`) of the candidates ``{m : U_m ≥ (1 − 10⁻⁵) max_j L_j}``
        (the slack covers the rounding of the means) contain ``m*`` and its exact score; the argmax over them is
        the exact router's argmax (up to exact ties and float32 rounding of the scores, which the two
        routers may break differently, as any two float32 products may) and the ratio is ``Δ_act_m* / ε_m*``.

        Why not truncated-SVD bounds ``‖a V_r Σ_r‖ ≤ s ≤ (‖a V_r Σ_r‖² + σ_{r+1}² ‖a_⊥‖²)^½``: the merged ``ΔW_m``
        have flat spectra and the activations spread over many directions, so on 100 real testbed memories the
        interval was 11 × (r = 32) to 27 × (r = 8) the exact score and pruned no memory at all, where this one is
        about ±4 % (docs/methods/wise.md). A row whose stage-1 values are not finite is scored exactly."""
        order, dt, eps = st
        b = a.shape[0]
        n_mem = len(order)
        x = a[sel]  # [n, d_in], the real tokens, row-major
        row_of = sel.nonzero()[:, 0]
        counts = sel.sum(dim=1)
        t_lo, t_hi = self.token_bounds(x)
        if self.pool == "max":  # bounds on every token's score bound their maximum the same way
            at = row_of.unsqueeze(1).expand(-1, n_mem)
            lo = torch.zeros(b, n_mem, device=dt.device).scatter_reduce_(0, at, t_lo, "amax")
            hi = torch.zeros(b, n_mem, device=dt.device).scatter_reduce_(0, at, t_hi, "amax")
        else:
            lo = torch.zeros(b, n_mem, device=dt.device).index_add_(0, row_of, t_lo)
            hi = torch.zeros(b, n_mem, device=dt.device).index_add_(0, row_of, t_hi)
            den = counts.clamp_min(1).unsqueeze(1).float()
            lo, hi = lo / den, hi / den
        finite = torch.isfinite(hi).all(dim=1) & torch.isfinite(lo).all(dim=1)
        cand = hi >= (1 - 1e-5) * lo.max(dim=1, keepdim=True).values
        cand |= ~finite.unsqueeze(1)
        self.last_candidates = cand
        # exact scores of the candidates: one product per memory, over the tokens of the rows it is a candidate of
        score = torch.full((b, n_mem), -math.inf, dtype=dt.dtype, device=dt.device)
        tok_cand = cand[row_of]  # [n, M]
        for j in cand.any(dim=0).nonzero()[:, 0].tolist():
            rows_j = cand[:, j]
            toks = tok_cand[:, j]
            s_j = torch.zeros(b, dtype=dt.dtype, device=dt.device)
            if bool(toks.any()):
                per_tok = torch.linalg.vector_norm(x[toks] @ self.deltas[order[j]].T, dim=-1)
                if self.pool == "max":
                    s_j.scatter_reduce_(0, row_of[toks], per_tok, "amax")
                else:
                    s_j.index_add_(0, row_of[toks], per_tok)
            if self.pool != "max":
                s_j = s_j / counts.clamp_min(1).to(dt.dtype)
            score[:, j] = torch.where(rows_j, s_j, score[:, j])
        where = score.argmax(dim=1)  # non-candidates are -inf; a row without real tokens has every score 0
        best = (score / eps).gather(1, where.unsqueeze(1)).squeeze(1)
        ids = torch.tensor(order, device=where.device)[where]
        return best, ids

    def raw_scores(self, acts: torch.Tensor, exclude: int | None = None) -> torch.Tensor:
        """``Δ_act_m(acts)`` of one sequence ``acts [T, d_in]`` under every live memory but ``exclude`` (``[M']``)."""
        st = self.stack()
        if st is None:
            return torch.zeros(0)
        order, dt, _ = st
        keep = [j for j, m in enumerate(order) if m != exclude]
        if not keep:
            return torch.zeros(0, dtype=dt.dtype, device=dt.device)
        a = acts.to(device=dt.device, dtype=dt.dtype)
        return pool_tokens(self._token_scores(a, dt).T, None, self.pool)[keep]


def _reference_ratios(state: MemoryState, acts: torch.Tensor, real: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The router by its definition, for the tests: every position of ``acts [B, T, d_in]`` against every memory
    (einsum ``btk,mok->btmo``, padding scored then masked out); :meth:`MemoryState.ratios` must decide the same."""
    if not state.deltas:
        return torch.zeros(acts.shape[0]), torch.full((acts.shape[0],), -1, dtype=torch.long)
    order = sorted(state.deltas)
    d = torch.stack([state.deltas[m] for m in order])
    eps = torch.tensor([state.eps[m] for m in order], dtype=d.dtype, device=d.device)
    a = acts.to(device=d.device, dtype=d.dtype)
    per_tok = torch.linalg.vector_norm(torch.einsum("btk,mok->btmo", a, d), dim=-1)  # [B, T, M]
    if state.pool == "max":
        if real is not None:
            per_tok = per_tok.masked_fill(real.to(per_tok.device).unsqueeze(-1) == 0, 0.0)
        score = per_tok.amax(dim=1)
    elif real is None:
        score = per_tok.mean(dim=1)
    else:
        r = real.to(device=per_tok.device, dtype=per_tok.dtype).unsqueeze(-1)
        score = (per_tok * r).sum(dim=1) / r.sum(dim=1).clamp_min(1)
    where = score.argmax(dim=1)
    best = (score / eps).gather(1, where.unsqueeze(1)).squeeze(1)
    return best, torch.tensor(order, device=where.device)[where]


class _Hook:
    """The layer hook (a callable object, so the memory is not captured in a closure)."""

    def __init__(self, mem: SideMemory) -> None:
        self.mem = mem

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        return self.mem.route(args[0], output)


class SideMemory(MemoryState):
    """WISE's side memories on one module, installed: the layer hook routes each sequence (see the module
    docstring). Duck-types :class:`~kedit.memory.codebook.Codebook`'s state interface, so :mod:`kedit.memory`
    adds, removes, snapshots, saves and loads it the same way."""

    kind = "wise"

    def __init__(self, module_path: str, d_in: int, d_out: int) -> None:
        super().__init__(module_path, d_in, d_out)
        self.handle: Any = None
        self.suspended = False
        self._root_handles: list[Any] = []
        self._ctx: tuple[torch.Tensor | None, int] | None = None
        self._route: torch.Tensor | None = None  # per row of the sequence in flight: memory id or -1
        #: per-row best ratio ``Δ_act_m / ε_m``, chosen memory (-1: main) and decision of the last sequence start
        self.last_scores: torch.Tensor | None = None
        self.last_memory: torch.Tensor | None = None
        self.last_route: torch.Tensor | None = None

    def _materialise(self, touched: Iterable[int]) -> None:
        super()._materialise(touched)
        self._route = None

    # -- routing ------------------------------------------------------------------------------------------------
    def route(self, x: torch.Tensor, output: Any) -> Any:
        st = self.stack()
        if st is None or self.suspended or not isinstance(output, torch.Tensor) or x.ndim < 2:
            return None
        x3 = x if x.ndim == 3 else x.unsqueeze(0)
        b, t = x3.shape[0], x3.shape[1]
        mask, past = self._ctx if self._ctx is not None else (None, 0)
        if past > 0 and self._route is not None and self._route.numel() == b:
            chosen = self._route
        else:
            real = None
            if mask is not None and mask.ndim == 2 and mask.shape[0] == b and mask.shape[1] >= t:
                real = mask[:, -t:]
            best, ids = self.ratios(x3, real)
            chosen = torch.where(best > 1.0, ids, torch.full_like(ids, -1))
            self.last_scores, self.last_memory, self.last_route = best.detach(), chosen, chosen >= 0
            if past == 0:
                self._route = chosen
        go = chosen >= 0
        if not bool(go.any()):
            return None  # the main memory: the module's own output, untouched
        out3 = output if output.ndim == 3 else output.unsqueeze(0)
        new = out3.clone()
        for m in sorted(set(chosen[go].tolist())):  # one product per memory in use (no per-row copies of ΔW)
            rows = (chosen == m).to(new.device)
            d = self.deltas[m]
            a = x3[rows.to(x3.device)].to(device=d.device, dtype=d.dtype)
            side = a @ d.T
            new[rows] = (out3[rows].to(side.dtype) + side.to(new.device)).to(new.dtype)
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
