"""Recursive least-squares editing (``rls``): MEMIT's targets, keys and residual spreading (Meng et al., ICLR
2023), with every applied edit kept in the least-squares objective through a running inverse updated by Woodbury's
identity -- the recursive least squares that issue #13 refers to as RLSEdit: a filter whose per-edit cost does not
grow with the number of earlier edits.

Per edited layer, batch ``t`` minimises ``‖ΔK − R‖² + Σ_{s<t} ‖ΔK_s‖² + λ tr(ΔCΔᵀ) + ε‖Δ‖²`` over the update
``Δ``: MEMIT's objective plus "do not move the outputs at any earlier edit's keys", whose normal matrix is
``A_t = λC + εI + Σ_{s≤t} K_sK_sᵀ``. RLS carries
``P_t = A_t⁻¹`` and, for the batch ``K`` ``[d_k, n]`` with residual ``R`` (measured on the current model),

    P_t = P_{t−1} − P_{t−1}K (I_n + KᵀP_{t−1}K)⁻¹ KᵀP_{t−1}          (Woodbury, an n × n solve)
    Δ   = R (P_t K)ᵀ = R Kᵀ (A_{t−1} + KKᵀ)⁻¹                      (the batch solve on the same keys)

so an earlier edit's keys resist being overwritten (``Δ`` is small on them) and the cost of a batch is
``O(d_k² n)`` per layer whatever ``t``. ``ε = ridge · tr(λC)/d_k`` keeps ``A_0`` invertible when ``C`` has dead
directions.

**State** (explicit, never global), as AlphaEdit's key cache (:mod:`kedit.methods.alphaedit`): each delta carries
the keys its solve used, ``"rls.keys.<layer>"`` in :attr:`~kedit.deltas.EditDelta.extras` (``[n, d_k]``; they are
the keys of the edited model too: a layer's input does not depend on its own or later layers). ``P_t`` is
*derived* from the RLS deltas applied to the model (:func:`kedit.deltas.applied_deltas`, oldest first), so
reverting a delta rolls the running inverse back with the weights, a delta never applied changes nothing, and a
reloaded delta brings its keys back. ``ctx.state["rls"]`` memoises ``P_0`` per ``(model key, layer, λ, ridge,
mom2_n_tokens)`` and the running ``P_t`` by the application ids of the deltas it folds; when deltas were only added
on top, the memo is extended by one Woodbury step per new delta (the flat per-edit cost), otherwise (after a
revert) it is rebuilt from ``P_0`` by the same fold -- bitwise the same inverse.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kedit.arch import get_adapter
from kedit.core.config import LocateEditConfig
from kedit.core.context import EditContext
from kedit.core.solve import solve_spd
from kedit.core.targets import Site
from kedit.core.walk import Walk, covariances, make_delta, resolve_layers, run_walk
from kedit.deltas import EditDelta, applied_deltas
from kedit.methods.blue import plan_stages, preset_overrides
from kedit.methods.registry import register_method
from kedit.requests import EditRequest

__all__ = ["KEYS_EXTRA", "STATE_KEY", "RLSConfig", "compute_rls", "rls_state", "running_inverse", "woodbury_update"]

log = logging.getLogger(__name__)

#: key of this method's entry in ``EditContext.state``
STATE_KEY = "rls"
#: prefix of the delta extras holding the keys a batch's solve used: ``f"{KEYS_EXTRA}{layer}"`` -> ``[n, d_k]``
KEYS_EXTRA = "rls.keys."


@dataclass
class RLSConfig(LocateEditConfig):
    """RLS hyper-parameters; see :class:`~kedit.core.config.LocateEditConfig` for the shared fields.

    Attributes:
        mom2_update_weight: λ, the weight of the preserved-key term ``λ tr(Δ C Δᵀ)`` in ``A_0`` (MEMIT's).
        ridge: ε relative to the mean eigenvalue of ``λC`` (``ε = ridge · tr(λC)/d_k``), so ``A_0`` is invertible.
    """

    mom2_update_weight: float = 15000.0
    ridge: float = 1e-6


def rls_state(ctx: EditContext) -> dict[str, Any]:
    """This method's memos on ``ctx``: ``{"p0": {...}, "running": {...}}`` (see the module docstring)."""
    state = ctx.state.setdefault(STATE_KEY, {})
    state.setdefault("p0", {})
    state.setdefault("running", {})
    return state


def woodbury_update(P: torch.Tensor, K: torch.Tensor, *, what: str = "RLS") -> torch.Tensor:
    """``(P⁻¹ + K Kᵀ)⁻¹`` from ``P`` ``[d_k, d_k]`` (symmetric positive definite) and ``K`` ``[d_k, n]``, by
    Woodbury: ``P − PK (I + KᵀPK)⁻¹ KᵀP``, in float64 -- ``O(d_k² n)``. Symmetrised."""
    K64 = K.to(device=P.device, dtype=torch.float64)
    PK = P @ K64  # [d_k, n]
    S = K64.T @ PK
    S = 0.5 * (S + S.T) + torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
    out = P - PK @ solve_spd(S, PK.T, what=f"{what} (I + KᵀPK)")
    return 0.5 * (out + out.T)


def _p0(ctx: EditContext, model, tok, layers: Sequence[int], config: RLSConfig, device_of_layer) -> dict:
    state = rls_state(ctx)
    mk = ctx.model_key(model)
    lam = float(config.mom2_update_weight)
    keys = {l: (mk, l, lam, float(config.ridge), config.mom2_n_tokens) for l in layers}
    missing = [l for l in layers if keys[l] not in state["p0"]]
    if missing:
        C = covariances(ctx, model, tok, missing, config.mom2_n_tokens)
        for l in missing:
            A = lam * C[l].to(device=device_of_layer(l), dtype=torch.float64)
            A = 0.5 * (A + A.T)
            eps = float(config.ridge) * float(A.trace()) / A.shape[0]
            A = A + eps * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
            eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
            P = solve_spd(A, eye, what=f"RLS layer {l} (λC + εI)")
            state["p0"][keys[l]] = 0.5 * (P + P.T)
    return {l: state["p0"][keys[l]] for l in layers}


def running_inverse(
    model, ctx: EditContext, layers: Sequence[int], p0: dict[int, torch.Tensor]
) -> tuple[dict[int, torch.Tensor], int, int]:
    """``P_{t−1}`` per layer folded over the RLS deltas applied to ``model`` (oldest first) from ``p0``, the number
    of those deltas, and the number of Woodbury steps this call performed (memoised on ``ctx`` by application ids:
    1 per layer and new delta when deltas were only added on top)."""
    state = rls_state(ctx)
    mk = ctx.model_key(model)
    carrying = [
        (d.application_id, d.extras)
        for d in applied_deltas(model)
        if any(name.startswith(KEYS_EXTRA) for name in d.extras)
    ]
    out: dict[int, torch.Tensor] = {}
    steps = 0
    for layer in layers:
        name = f"{KEYS_EXTRA}{layer}"
        keys = [(token, extras[name]) for token, extras in carrying if name in extras]
        tokens = tuple(token for token, _ in keys)
        base = p0[layer]
        memo = state["running"].get((mk, layer))
        P, start = base, 0
        if (
            memo is not None
            and memo[2] is base
            and len(memo[0]) <= len(tokens)
            and tokens[: len(memo[0])] == memo[0]
        ):
            start, P = len(memo[0]), memo[1]
        for _, K in keys[start:]:
            P = woodbury_update(P, K.T, what=f"RLS layer {layer}")
            steps += 1
        if keys:
            state["running"][(mk, layer)] = (tokens, P, base)
        else:
            state["running"].pop((mk, layer), None)
        out[layer] = P
    return out, len(carrying), steps


def compute_rls(
    model, tok, requests: Sequence[EditRequest], config: RLSConfig, ctx: EditContext | None = None
) -> EditDelta:
    """The RLS delta for ``requests``, solved against every RLS batch applied to ``model``; it carries the keys of
    its solve (:data:`KEYS_EXTRA`). The model, and every state the delta could affect until applied, is unchanged."""
    ctx = ctx or EditContext()
    name = "RLS"
    if not config.mom2_update_weight > 0:
        raise ValueError(f"{name}: mom2_update_weight must be > 0, got {config.mom2_update_weight}")
    if not config.ridge >= 0:
        raise ValueError(f"{name}: ridge must be ≥ 0, got {config.ridge}")
    adapter = get_adapter(model)
    layers = resolve_layers(model, adapter, config.layers, name)
    stages = plan_stages(layers, config.strategy, "linear")
    edited = [s.layer for s in stages]

    def device_of_layer(l):
        return adapter.module(model, "mlp_out", l).weight.device

    p0 = _p0(ctx, model, tok, edited, config, device_of_layer)
    prev, n_previous, steps = running_inverse(model, ctx, edited, p0)
    used: dict[int, torch.Tensor] = {}

    def solve(layer, K, R):
        P = woodbury_update(prev[layer], K, what=f"{name} layer {layer}")
        right = (P @ K.to(device=P.device, dtype=torch.float64)).T  # [n, d_k]
        used[layer] = K
        return R.to(device=P.device, dtype=torch.float64), right

    walk = Walk(name, lambda l: [Site("block", l)], lambda l: Site("block", l), solve)
    result = run_walk(model, tok, adapter, requests, stages, walk, config, ctx)
    extra = {"rls": {"previous_batches": n_previous, "woodbury_steps": steps}}
    delta = make_delta(
        model, adapter, result, method="rls", config=config, requests=requests, layers=layers, extra_meta=extra
    )
    delta.extras.update({f"{KEYS_EXTRA}{l}": K.T.float().cpu().contiguous() for l, K in used.items()})
    return delta


register_method(
    "rls",
    config=RLSConfig,
    compute=compute_rls,
    paper="recursive least squares (Woodbury) over MEMIT's solve (Meng et al., ICLR 2023); issue #13's RLSEdit",
    summary="MEMIT with every applied edit's keys in the least squares, a Woodbury-updated running inverse",
    presets=lambda model: preset_overrides("memit", model),
    rollback="exact (LIFO), running inverse included (derived from the applied deltas; a revert rebuilds it)",
)
