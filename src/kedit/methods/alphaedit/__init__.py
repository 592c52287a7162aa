"""AlphaEdit: Null-Space Constrained Knowledge Editing for Language Models (Fang, Jiang, Wang, Ma, Shi, Wang, He,
Chua, ICLR 2025; code jianghoucheng/AlphaEdit).

Targets, keys and residual spreading are MEMIT's (:mod:`kedit.methods.memit`). The perturbation of each layer is
projected onto the approximate null space of the preserved-knowledge keys ``K_0``: with ``C = E[k kᵀ] = U S Uᵀ`` and
``U_s`` the eigenvectors whose eigenvalue is below ``nullspace_threshold`` τ, ``P = U_s U_sᵀ`` and

    Δ_j = R_j K_jᵀ P ((K_jK_jᵀ + K_pK_pᵀ) P + αI)⁻¹         (α = ``l2``; the reference's fp32 solve, done in fp64)

so ``Δ(I − P) = 0`` and ``(W + Δ) K_0 ≈ W K_0``: preservation holds by construction and λC disappears from the
objective. ``K_p K_pᵀ`` accumulates the keys of previous edits, so sequential batches do not overwrite each other.

**State** (explicit, never global). The previous edits' keys ``K_p`` travel **with the deltas**: with
``accumulate_keys``, the keys of the batch are **recomputed on the edited model** (all layers updated, as the
reference does after each batch) and stored in the delta's :attr:`~kedit.deltas.EditDelta.extras` as
``"alphaedit.keys.<layer>"`` (``K``, ``[n, d_k]``). ``K_pK_pᵀ`` is then *derived* from the AlphaEdit deltas
currently applied to the model (:func:`kedit.deltas.applied_deltas`, oldest first: ``Σ K_iᵀK_i`` folded in apply
order, as the reference accumulates it), so

* the keys of applied earlier edits enter the next solve (sequential editing, as before);
* a reverted delta leaves nothing behind -- reverting the weights rolls the key cache back with them, exactly;
* ``compute`` does not change any state for the delta it returns: a delta that is never applied has no effect;
* a saved AlphaEdit delta, reloaded and applied, brings its keys back.

``ctx.state["alphaedit"]`` (on the :class:`~kedit.core.context.EditContext`) only caches pure functions of its
inputs: ``"nullspace"``, the basis ``U_s`` per ``(model key, layer, τ, mode, mom2_n_tokens)`` computed once from the
context's statistics of the *base* model (``ctx.model_key`` is the first model the context saw), and
``"key_cache"``, a memo of the running ``K_pK_pᵀ`` per ``(model key, layer)`` keyed by the application ids of the
deltas it sums (:attr:`~kedit.deltas.EditDelta.application_id`; extended when deltas were added on top, rebuilt
from the deltas otherwise -- the same fold, so bitwise the same sum). A context may thus be reused across
unrelated single edits (apply, evaluate, revert) without leaking keys, and any context sees the keys of the
AlphaEdit deltas applied to the model it edits.

``strategy="blue"`` / ``alphaedit-blue``: BLUE's ``if hparams.blue`` branch -- first and last layer, targets
re-optimised at each, undivided residual, same projected solve.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kedit.arch import get_adapter
from kedit.core.config import LocateEditConfig
from kedit.core.context import EditContext
from kedit.core.solve import NULLSPACE_MODES, nullspace_basis, projected_update_factors
from kedit.core.targets import Site
from kedit.core.walk import (
    Walk,
    group_sizes,
    make_delta,
    request_keys,
    resolve_layers,
    run_walk,
)
from kedit.deltas import EditDelta, applied_deltas
from kedit.methods.blue import BLUE_PAPER, plan_stages, preset_overrides
from kedit.methods.registry import register_method
from kedit.requests import EditRequest

__all__ = [
    "KEYS_EXTRA",
    "STATE_KEY",
    "AlphaEditBlueConfig",
    "AlphaEditConfig",
    "alphaedit_state",
    "compute_alphaedit",
    "previous_key_moments",
]

#: key of this method's entry in ``EditContext.state``
STATE_KEY = "alphaedit"
#: prefix of the delta extras holding a batch's keys on the edited model: ``f"{KEYS_EXTRA}{layer}"`` -> ``[n, d_k]``
KEYS_EXTRA = "alphaedit.keys."


@dataclass
class AlphaEditConfig(LocateEditConfig):
    """AlphaEdit hyper-parameters; see :class:`~kedit.core.config.LocateEditConfig` for the shared fields.

    Attributes:
        nullspace_threshold: τ (``nullspace_threshold``, 2e-2 in the reference, absolute).
        nullspace_mode: ``"absolute"`` (eigenvalue < τ, the paper), ``"relative"`` (< τ·max) or ``"energy"``
            (the tail holding a fraction τ of the key energy); see :func:`kedit.core.solve.nullspace_basis`.
        l2: α (``L2``), the ridge on the projected perturbation.
        accumulate_keys: carry this batch's keys (recomputed on the edited model) in the delta, so that once it is
            applied later AlphaEdit edits of the model add its ``K Kᵀ`` to ``K_pK_pᵀ``.
    """

    nullspace_threshold: float = 2e-2
    nullspace_mode: str = "absolute"
    l2: float = 10.0
    accumulate_keys: bool = True


@dataclass
class AlphaEditBlueConfig(AlphaEditConfig):
    """:class:`AlphaEditConfig` with ``strategy="blue"`` by default (the ``alphaedit-blue`` method)."""

    strategy: str = "blue"


def alphaedit_state(ctx: EditContext) -> dict[str, Any]:
    """This method's caches on ``ctx``: ``{"nullspace": {...}, "key_cache": {...}}`` (see the module docstring)."""
    state = ctx.state.setdefault(STATE_KEY, {})
    state.setdefault("nullspace", {})
    state.setdefault("key_cache", {})
    return state


def previous_key_moments(
    model, ctx: EditContext, layers: Sequence[int]
) -> tuple[dict[int, torch.Tensor | None], int]:
    """``K_pK_pᵀ`` (fp64, CPU; ``None`` when no key) per layer, summed over the AlphaEdit deltas applied to
    ``model`` in apply order, and the number of those deltas. Memoised on ``ctx`` by application ids."""
    state = alphaedit_state(ctx)
    mk = ctx.model_key(model)
    carrying = [
        (d.application_id, d.extras)
        for d in applied_deltas(model)
        if any(name.startswith(KEYS_EXTRA) for name in d.extras)
    ]
    out: dict[int, torch.Tensor | None] = {}
    for layer in layers:
        name = f"{KEYS_EXTRA}{layer}"
        keys = [(token, extras[name]) for token, extras in carrying if name in extras]
        tokens = tuple(token for token, _ in keys)
        memo = state["key_cache"].get((mk, layer))
        total: torch.Tensor | None = None
        start = 0
        if memo is not None and len(memo[0]) <= len(tokens) and tokens[: len(memo[0])] == memo[0]:
            start, total = len(memo[0]), memo[1]  # extend the memo: the same left fold as from scratch
        for _, K in keys[start:]:
            K64 = K.double().cpu()
            inc = K64.T @ K64
            total = inc if total is None else total + inc
        if keys:
            state["key_cache"][(mk, layer)] = (tokens, total)
        else:
            state["key_cache"].pop((mk, layer), None)
        out[layer] = total
    return out, len(carrying)


def _bases(
    model, tok, ctx: EditContext, layers: list[int], config: AlphaEditConfig, name: str
) -> dict[int, Any]:
    adapter = get_adapter(model)
    state = alphaedit_state(ctx)
    mk = ctx.model_key(model)
    keys = {
        l: (mk, l, float(config.nullspace_threshold), config.nullspace_mode, config.mom2_n_tokens)
        for l in layers
    }
    missing = [l for l in layers if keys[l] not in state["nullspace"]]
    if missing:
        stats = ctx.second_moments(model, tok, missing, n_tokens=config.mom2_n_tokens)
        for l in missing:
            # C is on the CPU (StatsCache); the eigendecomposition runs in fp64 where the layer's weight lives,
            # so the cached basis is on the device its solves use
            device = adapter.module(model, "mlp_out", l).weight.device
            basis = nullspace_basis(
                stats[l].mean.to(device), config.nullspace_threshold, mode=config.nullspace_mode
            )
            if basis.shape[1] == 0:
                raise ValueError(
                    f"{name} layer {l}: no eigenvalue of C is below nullspace_threshold="
                    f"{config.nullspace_threshold} ({config.nullspace_mode}); the projector is 0 and no edit is "
                    "possible. Raise the threshold or use nullspace_mode='relative' / 'energy'"
                )
            state["nullspace"][keys[l]] = basis
    return {l: state["nullspace"][keys[l]] for l in layers}


def compute_alphaedit(
    model, tok, requests: Sequence[EditRequest], config: AlphaEditConfig, ctx: EditContext | None = None
) -> EditDelta:
    """The AlphaEdit (or AlphaEdit-BLUE) delta, solved with the keys of the AlphaEdit deltas applied to ``model``;
    with ``accumulate_keys`` it carries this batch's keys on the edited model (:data:`KEYS_EXTRA`). The model is left
    unchanged, and so is every state that the returned delta could affect until it is applied."""
    ctx = ctx or EditContext()
    name = "AlphaEdit-BLUE" if config.strategy == "blue" else "AlphaEdit"
    if config.nullspace_mode not in NULLSPACE_MODES:
        raise ValueError(
            f"{name}: nullspace_mode must be one of {NULLSPACE_MODES}, got {config.nullspace_mode!r}"
        )
    if not config.l2 >= 0:
        raise ValueError(f"{name}: l2 must be ≥ 0, got {config.l2}")
    adapter = get_adapter(model)
    layers = resolve_layers(model, adapter, config.layers, name)
    stages = plan_stages(layers, config.strategy, "linear")
    edited = [s.layer for s in stages]
    bases = _bases(model, tok, ctx, edited, config, name)
    prev, n_previous = previous_key_moments(model, ctx, edited)

    def solve(layer, K, R):
        return projected_update_factors(
            K, R, bases[layer], config.l2, prev_kkt=prev[layer], what=f"{name} layer {layer} (P A + αI)"
        )

    templates = ctx.context_templates(model, tok, config.context_lengths)
    groups = group_sizes(config, ctx)

    def edited_keys(m):
        return request_keys(m, tok, adapter, edited, requests, templates, group_sizes=groups)

    walk = Walk(
        name,
        lambda l: [Site("block", l)],
        lambda l: Site("block", l),
        solve,
        after=edited_keys if config.accumulate_keys else None,
    )
    result = run_walk(model, tok, adapter, requests, stages, walk, config, ctx, templates=templates)
    extra = {
        "alphaedit": {
            "nullspace_dims": {str(l): int(bases[l].shape[1]) for l in edited},
            "previous_batches": n_previous,
            "previous_key_energy": {
                str(l): float(prev[l].trace()) if prev[l] is not None else 0.0 for l in edited
            },
        }
    }
    delta = make_delta(
        model,
        adapter,
        result,
        method=name.lower(),
        config=config,
        requests=requests,
        layers=layers,
        extra_meta=extra,
    )
    if config.accumulate_keys:
        delta.extras.update({f"{KEYS_EXTRA}{l}": K.detach().cpu().contiguous() for l, K in result.after.items()})
    return delta


_PAPER = "Fang et al., AlphaEdit: Null-Space Constrained Knowledge Editing for Language Models, ICLR 2025"
_ROLLBACK = "exact (LIFO), key cache included (derived from the applied deltas); removing a middle edit needs a rebuild"
register_method(
    "alphaedit",
    config=AlphaEditConfig,
    compute=compute_alphaedit,
    paper=_PAPER,
    summary="MEMIT-style edits projected onto the null space of preserved keys, accumulating edited keys",
    presets=lambda model: preset_overrides("alphaedit", model),
    rollback=_ROLLBACK,
)
register_method(
    "alphaedit-blue",
    config=AlphaEditBlueConfig,
    compute=compute_alphaedit,
    paper=f"{BLUE_PAPER}; {_PAPER}",
    summary="AlphaEdit updating only the first and last critical layers (BLUE)",
    presets=lambda model: preset_overrides("alphaedit", model, strategy="blue"),
    rollback=_ROLLBACK,
)
