"""The phase-2 penalty ``λ · Σ_l α_l · Σ_{i∈l} w_i (θ_i − θ*_i)²`` with element weights ``w`` (SI's Ω or EWC's Fisher)
and layer-wise coefficients ``α_l`` (Song et al., arXiv 2501.13669, "hierarchical layer-wise and element-wise
regularization"). The paper balances the two terms dynamically; its exact rule is not given, so the modes are:

* ``dynamic`` (default of SI): per step ``α_l = L_l / Σ_l' L_l'`` (detached: a distribution over the layers that
  follows how far each layer has drifted from the anchor) and ``λ = weight × (number of layers)``, so equal drift
  gives the ``none`` penalty and a layer that drifts more is pulled back harder;
* ``balanced``: ``α_l`` as in ``dynamic`` and ``λ_t = weight · L_CE / Σ_l α_l L_l`` (detached), so the penalty equals
  ``weight × L_CE`` at every step (SYSTEMS.md §4 option (b)). Its gradient grows like ``1/‖θ − θ*‖`` near the
  anchor; on the testbed it either pins the adapter (weight ≥ 0.03) or protects nothing (0.01), see docs/finetune.md;
* ``static``: ``α_l = mean(w over l) / mean over layers of that``, ``λ = weight``;
* ``none`` (default of EWC): ``α_l = 1``, ``λ = weight`` — plain EWC ``λ Σ F_i (θ_i − θ*_i)²``.

``L_l = Σ_{i∈l} w_i (θ_i − θ*_i)²``. With a ``view`` (EWC-LoRA) the elements are those of the views' tensors, e.g.
each adapted matrix's ``ΔW = s·B A``: ``L_l = Σ_{W∈l} Σ F_W ⊙ (ΔW − ΔW*)²``. At ``θ = θ*`` the penalty and its gradient are exactly zero in every mode.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .importance import Importance

__all__ = ["LAYER_COEFFS", "ImportancePenalty"]

LAYER_COEFFS = ("dynamic", "balanced", "static", "none")


class ImportancePenalty:
    """Importance-weighted quadratic pull of the parameters towards the anchor, grouped by layer.

    Args:
        importance: element weights and anchor, by parameter name.
        layers: the layer (any hashable group key) of every parameter name in ``importance``.
        mode: ``dynamic``, ``static`` or ``none`` (see the module docstring).
        weight: ``λ`` (static/none), ``λ`` per layer (dynamic) or the penalty-to-CE ratio (balanced); ``>= 0``.
        view: maps the trained parameters to the tensors the weights are about (keyed like ``importance.weights``);
            ``None``: the parameters themselves.
    """

    def __init__(
        self,
        importance: Importance,
        layers: Mapping[str, object],
        mode: str = "dynamic",
        weight: float = 1.0,
        view: Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]] | None = None,
    ) -> None:
        if mode not in LAYER_COEFFS:
            raise ValueError(f"unknown layer coefficient mode {mode!r}; expected one of {LAYER_COEFFS}")
        if weight < 0:
            raise ValueError(f"the penalty weight must be >= 0, got {weight}")
        missing = sorted(set(importance.weights) - set(layers))
        if missing:
            raise ValueError(f"no layer given for parameter(s) {missing[:3]}")
        self.importance = importance
        self.view = view
        with torch.no_grad():
            self.anchor = dict(view(importance.anchor)) if view is not None else importance.anchor
        missing = sorted(set(importance.weights) - set(self.anchor))
        if missing:
            raise ValueError(f"no anchor value for weighted tensor(s) {missing[:3]}")
        self.mode = mode
        self.weight = float(weight)
        self.groups: dict[object, list[str]] = {}
        for n in importance.weights:
            self.groups.setdefault(layers[n], []).append(n)
        self.static_alpha: dict[object, float] = {}
        if mode == "static":
            means = {
                g: float(torch.cat([importance.weights[n].flatten() for n in ns]).mean())
                for g, ns in self.groups.items()
            }
            overall = sum(means.values()) / len(means)
            self.static_alpha = {g: (m / overall if overall > 0 else 1.0) for g, m in means.items()}
        self.last_alpha: dict[object, float] = {}

    def layer_losses(self, params: Mapping[str, torch.Tensor]) -> dict[object, torch.Tensor]:
        """``L_l = Σ_{i∈l} w_i (θ_i − θ*_i)²`` per layer (differentiable in ``params``)."""
        w, a = self.importance.weights, self.anchor
        cur = self.view(params) if self.view is not None else params
        out = {}
        for g, names in self.groups.items():
            out[g] = sum((w[n] * (cur[n] - a[n]).square()).sum() for n in names)
        return out

    def __call__(self, params: Mapping[str, torch.Tensor], ce: torch.Tensor | None = None) -> torch.Tensor:
        """The penalty at ``params``; ``ce`` (the task loss of the step) is needed by the dynamic mode."""
        losses = self.layer_losses(params)
        if self.mode == "none":
            alpha = {g: 1.0 for g in losses}
            lam = self.weight
        elif self.mode == "static":
            alpha = self.static_alpha
            lam = self.weight
        else:
            with torch.no_grad():
                total = sum(float(v.detach()) for v in losses.values())
            if total <= 0.0:  # at the anchor: nothing to balance, the penalty and its gradient are 0
                alpha = {g: 1.0 / len(losses) for g in losses}
                lam = 0.0
            else:
                alpha = {g: float(v.detach()) / total for g, v in losses.items()}
                if self.mode == "dynamic":
                    lam = self.weight * len(losses)
                else:
                    if ce is None:
                        raise ValueError("the balanced layer coefficients need the step's task loss (ce)")
                    weighted = sum(alpha[g] * float(v.detach()) for g, v in losses.items())
                    lam = self.weight * float(ce.detach()) / weighted
        self.last_alpha = dict(alpha)
        return lam * sum(alpha[g] * v for g, v in losses.items())
