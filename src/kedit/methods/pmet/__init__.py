"""PMET: Precise Model Editing in a Transformer (Li, Li, Song, Yang, Ma, Yu, AAAI 2024; code xpq-tech/PMET).

MEMIT's residual target at the block output also carries what attention contributes. PMET optimises the
attention-output **and** the MLP-output hidden states of the last critical layer ``l_L`` together (two δ's, each
clamped to ``clamp_norm_factor · ‖its initial value‖``, with PMET's adaptive NLL weight), then uses only the MLP
one, ``m*``, as the target of the MLP output projections. Attention weights are never edited.

For ``j = 1..L`` on the current model: ``R = m* − m^{l_L}`` (the ``mlp_out`` output at ``l_L`` on the plain
prompts), ``R_j = R / √(L − j + 1)`` -- a square root, not MEMIT's ``1/(L − j + 1)`` -- and
``Δ_j = R_j K_jᵀ (K_j K_jᵀ + λ C_j)⁻¹`` (the same fp64 ridge solve as MEMIT, :func:`ridge_update_factors`).

``strategy="blue"`` (or ``pmet-blue``): BLUE's ``execute_pmet_lbl`` -- first and last layer only, ``m*`` re-optimised
at each layer's MLP output, undivided residual.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kedit.arch import get_adapter
from kedit.core.config import LocateEditConfig, target_config
from kedit.core.context import EditContext
from kedit.core.solve import ridge_update_factors
from kedit.core.targets import Site
from kedit.core.walk import (
    Walk,
    covariances,
    make_delta,
    resolve_layers,
    run_walk,
)
from kedit.deltas import EditDelta
from kedit.methods.blue import BLUE_PAPER, plan_stages, preset_overrides
from kedit.methods.registry import register_method
from kedit.requests import EditRequest

__all__ = ["PMETBlueConfig", "PMETConfig", "compute_pmet"]


@dataclass
class PMETConfig(LocateEditConfig):
    """PMET hyper-parameters; see :class:`~kedit.core.config.LocateEditConfig` for the shared fields.

    Attributes:
        mom2_update_weight: λ of the preservation term (as MEMIT).
        nll_loss_factor: ν, the NLL weight; once the target is the argmax at every target position it drops to
            ``0.1·ν`` and the request stops when KL ≤ 0.01 (PMET's adaptive weight).
        attn_clamp_norm_factor: clamp of the attention δ relative to its initial norm; ``None`` (PMET): the same
            ``clamp_norm_factor`` as the MLP δ. The attention δ is discarded after the optimisation, so the less
            of the change it is allowed to carry, the more the written MLP target has to; ``0`` leaves the MLP δ
            alone (a MEMIT target at the MLP output, spread with PMET's square root).
    """

    mom2_update_weight: float = 15000.0
    nll_loss_factor: float = 1.0
    attn_clamp_norm_factor: float | None = None


@dataclass
class PMETBlueConfig(PMETConfig):
    """:class:`PMETConfig` with ``strategy="blue"`` by default (the ``pmet-blue`` method)."""

    strategy: str = "blue"


def _sites(layer: int) -> list[Site]:
    return [Site("attn_out", layer), Site("mlp_out", layer)]


def compute_pmet(
    model, tok, requests: Sequence[EditRequest], config: PMETConfig, ctx: EditContext | None = None
) -> EditDelta:
    """The PMET (or PMET-BLUE) delta for ``requests``; only ``mlp_out`` weights are updated. Model unchanged."""
    ctx = ctx or EditContext()
    name = "PMET-BLUE" if config.strategy == "blue" else "PMET"
    adapter = get_adapter(model)
    layers = resolve_layers(model, adapter, config.layers, name)
    stages = plan_stages(layers, config.strategy, "sqrt")
    edited = [s.layer for s in stages]
    by_slot = None if config.attn_clamp_norm_factor is None else {"attn_out": config.attn_clamp_norm_factor}
    # built (and validated) before the statistics are computed
    tcfg = target_config(config, adaptive_nll=True, nll_factor=config.nll_loss_factor, clamp_by_slot=by_slot)
    C = covariances(ctx, model, tok, edited, config.mom2_n_tokens)
    lam = config.mom2_update_weight

    def solve(layer, K, R):
        return ridge_update_factors(K, R, C[layer], lam, what=f"{name} layer {layer} (KKᵀ + λC)")

    walk = Walk(name, _sites, lambda l: Site("mlp_out", l), solve)
    result = run_walk(model, tok, adapter, requests, stages, walk, config, ctx, tcfg=tcfg)
    return make_delta(
        model, adapter, result, method=name.lower(), config=config, requests=requests, layers=layers
    )


_PAPER = "Li et al., PMET: Precise Model Editing in a Transformer, AAAI 2024"
_ROLLBACK = "exact (LIFO); removing a middle edit of a sequence needs a rebuild"
register_method(
    "pmet",
    config=PMETConfig,
    compute=compute_pmet,
    paper=_PAPER,
    summary="MEMIT with attention+MLP targets, MLP-only updates and 1/sqrt(L-j+1) spreading",
    presets=lambda model: preset_overrides("pmet", model),
    rollback=_ROLLBACK,
)
register_method(
    "pmet-blue",
    config=PMETBlueConfig,
    compute=compute_pmet,
    paper=f"{BLUE_PAPER}; {_PAPER}",
    summary="PMET updating only the first and last critical layers (BLUE)",
    presets=lambda model: preset_overrides("pmet", model, strategy="blue"),
    rollback=_ROLLBACK,
)
