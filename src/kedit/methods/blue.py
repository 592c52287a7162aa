"""BLUE, the Boundary Layer UpdatE strategy (Li, Zhang, Liu et al., "Rethinking the Residual Distribution of
Locate-then-Editing Methods in Model Editing", arXiv 2502.03748; code: xpq-tech/BLUE).

Spreading a residual computed at the last critical layer over earlier layers introduces weight-shift errors that
grow with the distance between the layer and the target, the batch size and the sequence length. BLUE edits only the
**first and last** critical layers and computes each residual **at that layer**:

for ``l`` in ``[l_first, l_last]``, on the current model (``l_first`` already edited when ``l_last`` runs):

1. re-optimise the targets at ``l`` (``z_layer = l``): the block output (MEMIT, AlphaEdit) or the MLP output next
   to the attention output (PMET);
2. compute the keys ``K`` at ``l`` and ``R = Z − H^l`` with the current ``H^l``;
3. apply the base method's solve to the **whole** residual (no ``1/(L−j+1)`` division).

In kedit BLUE is a *plan* for the shared driver (:mod:`kedit.core.walk`), selected with
``strategy="blue"`` on the MEMIT, PMET and AlphaEdit configs. The methods are also registered as ``memit-blue``,
``pmet-blue`` and ``alphaedit-blue`` (what the CLI's ``--method memit --strategy blue`` resolves to); those
names only differ in their presets: the BLUE repository's layer pairs and the numbers it changes
(AlphaEdit_BLUE ``L2`` = 80 / 95 / 1 for GPT-2 XL / GPT-J / Llama-3-8B, PMET_BLUE GPT-J ``λ`` = 1000).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kedit.core.walk import Stage, spread_stages
from kedit.methods.presets import preset_entry_for, preset_for

__all__ = ["BLUE_PAPER", "STRATEGIES", "blue_stages", "plan_stages", "preset_overrides"]

#: residual strategies understood by the MEMIT-family configs
STRATEGIES = ("spread", "blue")

BLUE_PAPER = (
    "Li et al., Rethinking the Residual Distribution of Locate-then-Editing Methods in Model Editing, "
    "arXiv 2502.03748 (BLUE)"
)


def blue_stages(layers: Sequence[int]) -> list[Stage]:
    """BLUE's plan: the first and the last of ``layers`` (one stage if they coincide), each re-optimising its own
    targets at its own layer, with the whole residual."""
    boundary = sorted({layers[0], layers[-1]})
    return [Stage(layer, layer, 1.0, True) for layer in boundary]


def plan_stages(layers: Sequence[int], strategy: str, spread: str) -> list[Stage]:
    """The stages for ``strategy``: ``"spread"`` (targets at ``layers[-1]``, residual spread with the method's
    ``spread`` rule) or ``"blue"`` (:func:`blue_stages`)."""
    if strategy == "spread":
        return spread_stages(layers, spread)
    if strategy == "blue":
        return blue_stages(layers)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")


def preset_overrides(method: str, model: Any, *, strategy: str = "spread") -> dict[str, Any]:
    """Preset of ``method`` for ``model`` and ``strategy`` (:func:`kedit.methods.presets.preset_for`).

    ``<method>.json`` holds the plain presets and, marked ``"strategy": "blue"`` in their config, the BLUE ones.
    A model without a BLUE preset gets its plain preset with ``strategy="blue"``.
    """
    if strategy == "blue" and preset_entry_for(method, model, strategy="blue") is None:
        return {**preset_for(method, model), "strategy": "blue"}
    return preset_for(method, model, strategy=strategy)
