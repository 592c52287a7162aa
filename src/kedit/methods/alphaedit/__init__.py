"""AlphaEdit: Null-Space Constrained Knowledge Editing for Language Models (Fang, Jiang, Wang, Ma, Shi, Wang, He,
Chua, ICLR 2025; code jianghoucheng/AlphaEdit).

Targets, keys and residual spreading are MEMIT's (:mod:`kedit.methods.memit`). The perturbation of each layer is
projected onto the approximate null space of the preserved-knowledge keys ``K_0``: with ``C = E[k kᵀ] = U S Uᵀ`` and
``U_s`` the eigenvectors whose eigenvalue is below ``nullspace_threshold`` τ, ``P = U_s U_sᵀ`` and

    Δ_j = R_j K_jᵀ P ((K_jK_jᵀ + K_pK_pᵀ) P + αI)⁻¹         (α = ``l2``; the reference's fp32 solve, done in fp64)

so ``Δ(I − P) = 0`` and ``(W + Δ) K_0 ≈ W K_0``: preservation holds by construction and λC disappears from the
objective. ``K_p K_pᵀ`` accumulates the keys of previous edits, so sequential batches do not overwrite each other.

**State** (explicit, on the :class:`~kedit.core.context.EditContext`, never global): ``ctx.state["alphaedit"]``
holds

* ``"nullspace"``: the basis ``U_s`` per ``(model key, layer, τ, mode, mom2_n_tokens)``, computed once from the
  context's cached statistics of the *base* model (``ctx.model_key`` is the first model the context saw);
* ``"key_cache"``: ``K_pK_pᵀ`` per ``(model key, layer)``. When a delta is computed (``accumulate_keys``), the keys
  of the batch are **recomputed on the edited model** (all layers updated, as the reference does after each batch)
  and ``K Kᵀ`` is added -- at the end of ``compute``, only if it succeeded.

Sequential editing therefore needs **one EditContext reused across calls** (``kedit.edit(..., ctx=ctx)``), and it
assumes every computed delta is applied. Reverting a delta does not shrink the key cache: to roll back, restore the
model *and* the context state (``ctx.state["alphaedit"] = snapshot``) or start a new context.

``strategy="blue"`` / ``alphaedit-blue``: BLUE's ``if hparams.blue`` branch -- first and last layer, targets
re-optimised at each, undivided residual, same projected solve.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kedit.arch import get_adapter
from kedit.core.batching import device_of
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
from kedit.deltas import EditDelta
from kedit.methods.blue import BLUE_PAPER, plan_stages, preset_overrides
from kedit.methods.registry import register_method
from kedit.requests import EditRequest

__all__ = ["STATE_KEY", "AlphaEditBlueConfig", "AlphaEditConfig", "alphaedit_state", "compute_alphaedit"]

#: key of this method's entry in ``EditContext.state``
STATE_KEY = "alphaedit"


@dataclass
class AlphaEditConfig(LocateEditConfig):
    """AlphaEdit hyper-parameters; see :class:`~kedit.core.config.LocateEditConfig` for the shared fields.

    Attributes:
        nullspace_threshold: τ (``nullspace_threshold``, 2e-2 in the reference, absolute).
        nullspace_mode: ``"absolute"`` (eigenvalue < τ, the paper), ``"relative"`` (< τ·max) or ``"energy"``
            (the tail holding a fraction τ of the key energy); see :func:`kedit.core.solve.nullspace_basis`.
        l2: α (``L2``), the ridge on the projected perturbation.
        accumulate_keys: add this batch's ``K Kᵀ`` (recomputed on the edited model) to the context's key cache.
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
    """This method's state on ``ctx``: ``{"nullspace": {...}, "key_cache": {...}, "batches": int}``."""
    state = ctx.state.setdefault(STATE_KEY, {})
    state.setdefault("nullspace", {})
    state.setdefault("key_cache", {})
    state.setdefault("batches", 0)
    return state


def _bases(
    model, tok, ctx: EditContext, layers: list[int], config: AlphaEditConfig, name: str
) -> dict[int, Any]:
    state = alphaedit_state(ctx)
    mk = ctx.model_key(model)
    keys = {
        l: (mk, l, float(config.nullspace_threshold), config.nullspace_mode, config.mom2_n_tokens)
        for l in layers
    }
    missing = [l for l in layers if keys[l] not in state["nullspace"]]
    if missing:
        stats = ctx.second_moments(model, tok, missing, n_tokens=config.mom2_n_tokens)
        device = device_of(model)
        for l in missing:
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
    """The AlphaEdit (or AlphaEdit-BLUE) delta; with ``accumulate_keys`` the context's key cache grows by this
    batch's ``K Kᵀ``. The model is left unchanged."""
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
    state = alphaedit_state(ctx)
    mk = ctx.model_key(model)
    prev = {l: state["key_cache"].get((mk, l)) for l in edited}

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
            "previous_batches": int(state["batches"]),
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
    if config.accumulate_keys:  # commit only after everything succeeded
        for l, K in result.after.items():
            K64 = K.double().cpu()
            inc = K64.T @ K64
            old = state["key_cache"].get((mk, l))
            state["key_cache"][(mk, l)] = inc if old is None else old + inc
        state["batches"] += 1
    return delta


_PAPER = "Fang et al., AlphaEdit: Null-Space Constrained Knowledge Editing for Language Models, ICLR 2025"
_ROLLBACK = "weights exact (LIFO); the context's key cache is not rolled back, and removing a middle edit needs a rebuild"
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
