"""Configuration pieces shared by the locate-then-edit methods (ROME, MEMIT, PMET, AlphaEdit, EMMET, BLUE).

* :func:`auto_layers` -- the default edited layer(s) of a model of a given depth, one function for every method
  (ROME and EMMET ask it for a single layer, the multi-layer methods for a range);
* :func:`target_config` -- the :class:`~kedit.core.targets.TargetConfig` of any method config carrying the
  reference ``v_*`` target-optimisation fields, built in this one place;
* :class:`LocateEditConfig` -- the fields shared by the methods driven by :mod:`kedit.core.walk`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kedit.core.targets import TargetConfig

__all__ = ["SINGLE_LAYER_AT", "LocateEditConfig", "auto_layers", "target_config"]

#: relative depth of the single default layer of ROME and EMMET (ROME's choice: GPT-2 XL 17 of 48, GPT-J 5 of 28)
SINGLE_LAYER_AT = 0.25


def auto_layers(n_layers: int, *, count: int | None = None, last_at: float = 0.3) -> tuple[int, ...]:
    """Default edited layers of a model of depth ``n``: ``count`` consecutive layers ending at
    ``round(last_at·(n−1))`` (clipped to the model).

    ``count=None`` is the multi-layer default of MEMIT, PMET and AlphaEdit: ``min(5, max(2, round(n/8)))`` layers
    (one for models shallower than 4) ending at 0.3 of the depth -- the lower-middle MLPs where those papers place
    factual recall (GPT-2 XL 13–17 of 48, GPT-J 3–8 of 28, Llama 4–8 of 32; the presets hold those exact ranges).
    ROME and EMMET take ``count=1, last_at=SINGLE_LAYER_AT`` (one layer at a quarter of the depth).
    """
    if n_layers < 1:
        raise ValueError(f"a model needs at least one layer, got {n_layers}")
    if count is None:
        count = 1 if n_layers < 4 else min(5, max(2, round(n_layers / 8)))
    if not 1 <= count <= n_layers:
        raise ValueError(f"count must be in 1..{n_layers}, got {count}")
    last = min(n_layers - 1, max(count - 1, round(last_at * (n_layers - 1))))
    return tuple(range(last - count + 1, last + 1))


def target_config(
    config: Any, *, adaptive_nll: bool = False, nll_factor: float = 1.0, clamp_by_slot: dict[str, float] | None = None
) -> TargetConfig:
    """The :class:`TargetConfig` of a method config with the fields ``v_lr``, ``v_steps``, ``v_weight_decay``,
    ``clamp_norm_factor``, ``kl_factor`` and ``early_stop_loss`` (ROME's and every :class:`LocateEditConfig`)."""
    return TargetConfig(
        lr=config.v_lr,
        steps=config.v_steps,
        weight_decay=config.v_weight_decay,
        clamp_norm_factor=config.clamp_norm_factor,
        kl_factor=config.kl_factor,
        early_stop_loss=config.early_stop_loss,
        nll_factor=nll_factor,
        adaptive_nll=adaptive_nll,
        clamp_by_slot=clamp_by_slot,
    )


@dataclass
class LocateEditConfig:
    """Fields shared by MEMIT, PMET, AlphaEdit and EMMET (reference hyper-parameter names in parentheses).

    Attributes:
        layers: edited layers (``layers``); the targets are optimised at the last one (``z_layer = layers[-1]``).
            ``None``: :func:`auto_layers` from the depth.
        v_lr, v_steps, v_weight_decay, clamp_norm_factor, kl_factor, early_stop_loss: target optimisation
            (``v_lr``, ``v_num_grad_steps``, ``v_weight_decay``, ``clamp_norm_factor``, ``kl_factor``; loss < 0.05
            stops a request early).
        mom2_n_tokens: tokens of the statistics corpus for ``C = E[k kᵀ]`` (the reference counts 100k *texts*).
        context_lengths: ``((n_tokens, count), ...)`` of the sampled context templates; MEMIT's is 5 prefixes of
            10 tokens, plus the plain prompt.
        strategy: ``"spread"`` (the paper: residual spread over ``layers``) or ``"blue"`` (BLUE: only the first and
            last of ``layers``, targets re-optimised at each, undivided residual); see :mod:`kedit.methods.blue`.
        norm_anchor: Norm-Anchor Scaling (NAS; Liu, Zhu, Miao, Fujisawa, "Norm Anchors Make Model Edits Last",
            arXiv 2602.02543): rescale each optimised value vector ``z_i`` to the norm of the same request's value
            on the *original* model (the weights before every delta applied to it), ``z_i ← z_i ‖v0_i^orig‖ /
            ‖z_i‖``, breaking the feedback loop in which sequential edits grow value and weight norms together.
            Off by default (the base methods as published); see :func:`kedit.core.walk.anchor_norms`.
        debug: record per-stage ``K``, ``R``, ``Z``, ``H`` and ``v_0`` as JSON lists in ``delta.meta["debug"]``
            (tiny models only: ``(d_k + 4d)·n`` floats per layer).
    """

    layers: tuple[int, ...] | None = None
    v_lr: float = 0.5
    v_steps: int = 20
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    mom2_n_tokens: int = 100_000
    context_lengths: tuple[tuple[int, int], ...] = ((10, 5),)
    strategy: str = "spread"
    norm_anchor: bool = False
    debug: bool = False
