"""EMMET: Equality-constrained Mass Model Editing in a Transformer (Gupta, Sajnani, Anumanchipalli, "A Unified
Framework for Model Editing", EMNLP Findings 2024; batched ROME).

Where MEMIT trades the edit against preservation (least squares), EMMET **enforces** the edit:

    minimise tr(Δ C̃ Δᵀ)  subject to  Δ K = R,        C̃ = λ C + μ I

whose solution is ``Δ = R D⁻¹ Kᵀ C̃⁻¹`` with ``D = Kᵀ C̃⁻¹ K + λ_E I`` (λ = ``mom2_update_weight``,
μ = ``update_norm_lambda``, λ_E = ``emmet_lambda``, a ridge for ill-conditioned batches;
:func:`kedit.core.solve.emmet_update_factors`). With ``emmet_lambda = 0`` the constraint holds exactly.
Note that (λC)⁻¹ enters linearly, so relative to ``KᵀC⁻¹K`` the effective ridge is ``λ·λ_E``.

Targets and keys are MEMIT's; several layers use MEMIT's ``1/(L − j + 1)`` spreading (the EasyEdit presets edit a
single layer, like ROME).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kedit.arch import get_adapter
from kedit.core.config import SINGLE_LAYER_AT, LocateEditConfig, auto_layers
from kedit.core.context import EditContext
from kedit.core.solve import emmet_update_factors
from kedit.core.targets import Site
from kedit.core.walk import (
    Walk,
    covariances,
    make_delta,
    resolve_layers,
    run_walk,
    spread_stages,
)
from kedit.deltas import EditDelta
from kedit.methods.blue import preset_overrides
from kedit.methods.registry import register_method
from kedit.requests import EditRequest

__all__ = ["EMMETConfig", "compute_emmet"]


@dataclass
class EMMETConfig(LocateEditConfig):
    """EMMET hyper-parameters; see :class:`~kedit.core.config.LocateEditConfig` for the shared fields.

    ``layers=None`` picks one layer, ROME's (:func:`~kedit.core.config.auto_layers` with ``count=1``).
    ``strategy`` must stay ``"spread"`` (no BLUE variant).

    Attributes:
        mom2_update_weight: λ in ``C̃ = λC + μI``.
        update_norm_lambda: μ, an identity term on the preservation matrix (0 = off).
        emmet_lambda: λ_E, the ridge on ``KᵀC̃⁻¹K``; 0 enforces ``ΔK = R`` exactly.
    """

    mom2_update_weight: float = 10000.0
    update_norm_lambda: float = 0.0
    emmet_lambda: float = 0.1


def compute_emmet(
    model, tok, requests: Sequence[EditRequest], config: EMMETConfig, ctx: EditContext | None = None
) -> EditDelta:
    """The EMMET delta for ``requests``, computed jointly. The model is left unchanged."""
    ctx = ctx or EditContext()
    name = "EMMET"
    if config.strategy != "spread":
        raise ValueError(f"{name}: strategy must be 'spread' (BLUE is defined for MEMIT, PMET and AlphaEdit)")
    adapter = get_adapter(model)
    layers_cfg = config.layers
    if layers_cfg is None:
        layers_cfg = auto_layers(adapter.num_layers(model), count=1, last_at=SINGLE_LAYER_AT)
    layers = resolve_layers(model, adapter, layers_cfg, name)
    stages = spread_stages(layers, "linear")
    C = covariances(ctx, model, tok, layers, config.mom2_n_tokens)

    def solve(layer, K, R):
        return emmet_update_factors(
            K,
            R,
            C[layer],
            config.mom2_update_weight,
            mu=config.update_norm_lambda,
            ridge=config.emmet_lambda,
            what=f"{name} layer {layer}",
        )

    walk = Walk(name, lambda l: [Site("block", l)], lambda l: Site("block", l), solve)
    result = run_walk(model, tok, adapter, requests, stages, walk, config, ctx)
    return make_delta(model, adapter, result, method="emmet", config=config, requests=requests, layers=layers)


register_method(
    "emmet",
    config=EMMETConfig,
    compute=compute_emmet,
    paper="Gupta et al., A Unified Framework for Model Editing (EMMET), EMNLP Findings 2024",
    summary="batched ROME: covariance-weighted update with equality constraints ΔK = R",
    presets=lambda model: preset_overrides("emmet", model),
    rollback="exact (LIFO); removing a middle edit of a sequence needs a rebuild",
)
