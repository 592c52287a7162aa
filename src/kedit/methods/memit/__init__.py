"""MEMIT: Mass-Editing Memory in a Transformer (Meng, Sen Sharma, Andonian, Belinkov, Bau, ICLR 2023).

Many facts are inserted at once into the MLP output projections of a range of critical layers ``l_1 < … < l_L``:

1. for each request, ``z_i = h^{l_L}_i + δ_i`` where δ, added to the block output of ``l_L`` at the subject's last
   token, makes the model emit the new target (:func:`kedit.core.targets.optimize_targets`, computed once on the
   unedited model, independently per request);
2. for ``j = 1..L`` on the current model (earlier layers already updated): keys ``K_j`` at ``l_j``,
   ``R = Z − H^{l_L}``, ``R_j = R / (L − j + 1)``, ``Δ_j = R_j K_jᵀ (λC_j + K_j K_jᵀ)⁻¹`` in float64
   (:func:`kedit.core.solve.ridge_update_factors`), applied before the next layer.

``λ = mom2_update_weight`` and ``C_j = E[k kᵀ]`` (uncentred, a mean over ``mom2_n_tokens`` tokens of the context's
corpus). The returned delta has one rank-≤n :class:`~kedit.deltas.LowRankUpdate` per layer; the model is left
bit-identical. ``strategy="blue"`` (or the ``memit-blue`` name) runs BLUE instead (:mod:`kedit.methods.blue`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from kedit.arch import get_adapter
from kedit.core.config import LocateEditConfig
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

__all__ = ["MEMITBlueConfig", "MEMITConfig", "compute_memit"]

log = logging.getLogger(__name__)


@dataclass
class MEMITConfig(LocateEditConfig):
    """MEMIT hyper-parameters; see :class:`~kedit.core.config.LocateEditConfig` for the shared fields.

    Attributes:
        mom2_update_weight: λ, the weight of the preservation term ``λ tr(Δ C Δᵀ)``; since ``C`` is a mean, λ acts
            as a number of preserved keys.
    """

    mom2_update_weight: float = 15000.0


@dataclass
class MEMITBlueConfig(MEMITConfig):
    """:class:`MEMITConfig` with ``strategy="blue"`` by default (the ``memit-blue`` method)."""

    strategy: str = "blue"


def compute_memit(
    model, tok, requests: Sequence[EditRequest], config: MEMITConfig, ctx: EditContext | None = None
) -> EditDelta:
    """The MEMIT (or MEMIT-BLUE) delta for ``requests``, computed jointly. The model is left unchanged."""
    ctx = ctx or EditContext()
    name = "MEMIT-BLUE" if config.strategy == "blue" else "MEMIT"
    adapter = get_adapter(model)
    layers = resolve_layers(model, adapter, config.layers, name)
    stages = plan_stages(layers, config.strategy, "linear")
    edited = [s.layer for s in stages]
    C = covariances(ctx, model, tok, edited, config.mom2_n_tokens)
    lam = config.mom2_update_weight

    def solve(layer, K, R):
        return ridge_update_factors(K, R, C[layer], lam, what=f"{name} layer {layer} (λC + KKᵀ)")

    walk = Walk(name, lambda l: [Site("block", l)], lambda l: Site("block", l), solve)
    result = run_walk(model, tok, adapter, requests, stages, walk, config, ctx)
    return make_delta(
        model, adapter, result, method=name.lower(), config=config, requests=requests, layers=layers
    )


_PAPER = "Meng et al., Mass-Editing Memory in a Transformer, ICLR 2023"
register_method(
    "memit",
    config=MEMITConfig,
    compute=compute_memit,
    paper=_PAPER,
    summary="batched least-squares edits of several MLP layers, residual spread 1/(L-j+1)",
    presets=lambda model: preset_overrides("memit", model),
    rollback="exact (LIFO); removing a middle edit of a sequence needs a rebuild",
)
register_method(
    "memit-blue",
    config=MEMITBlueConfig,
    compute=compute_memit,
    paper=f"{BLUE_PAPER}; {_PAPER}",
    summary="MEMIT updating only the first and last critical layers (BLUE)",
    presets=lambda model: preset_overrides("memit", model, strategy="blue"),
    rollback="exact (LIFO); removing a middle edit of a sequence needs a rebuild",
)
