"""ROME: Rank-One Model Editing (Meng, Bau, Andonian, Belinkov, "Locating and Editing Factual Associations in
GPT", NeurIPS 2022), with the r-ROME consistency fixes (Gupta, Baskaran, Anumanchipalli, "Rebuilding ROME",
arXiv 2403.07175).

The MLP output projection of one layer is treated as a linear associative memory ``v = W k``. For a request:

1. ``k*`` = mean over context templates of the key at the subject's last token; ``k_e`` = the key on the plain
   prompt (:func:`kedit.core.keys.compute_keys`).
2. ``v* = v_e + δ`` where δ, added to the MLP output at the subject's last token, makes the model emit the new
   target (:func:`kedit.core.targets.optimize_targets`).
3. ``u = C⁻¹k*/‖C⁻¹k*‖`` with ``C = E[k kᵀ]`` (:class:`kedit.core.stats.StatsCache`, or ``C = I``), ``r = δ/(uᵀk_e)``
   and ``W ← W + r uᵀ`` (:func:`kedit.core.solve.rome_rank_one`), so the edited layer maps ``k_e`` to ``v*``.

``key_mode`` selects the keys (Gupta et al. trace ROME's collapses to the mismatch of the first mode):

* ``"rome"`` (the paper's code): ``u`` from ``k*``, denominator ``uᵀk_e``, residual ``δ = v* − W k_e``: the edited
  layer maps ``k_e`` to ``v*``;
* ``"prompt"`` (r-ROME, prompt keys): ``k_e`` everywhere: ``u ∝ C⁻¹k_e``, ``r = (v* − W k_e)/(uᵀk_e)``;
* ``"averaged"`` (r-ROME, random-prefix keys): ``k̄ = k*`` everywhere **and** the residual taken against the mean
  output over the same templates: ``u ∝ C⁻¹k̄``, ``r = (v* − mean_j W k_j)/(uᵀk̄)`` (bias included in both
  outputs), so the edited layer maps ``k̄`` to ``v*`` -- not ``k̄`` to ``W k̄ + δ``. ``v*`` is still ``v_e + δ``, the
  plain prompt's output plus the optimised shift, as in the r-ROME code.
Several requests are inserted one after another (each computed on the model with the previous ones applied,
as the reference does); the result is a single rank-n delta and the model is restored bit-identically.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from kedit.arch import get_adapter
from kedit.core.config import SINGLE_LAYER_AT, auto_layers, target_config
from kedit.core.context import EditContext
from kedit.core.keys import compute_keys
from kedit.core.solve import rome_rank_one
from kedit.core.targets import Site, optimize_targets, prompt_text
from kedit.core.walk import add_in_place, factors_for
from kedit.deltas import EditDelta, LowRankUpdate
from kedit.methods.presets import preset_for
from kedit.methods.registry import register_method
from kedit.requests import EditRequest

__all__ = ["ROMEConfig", "compute_rome"]

log = logging.getLogger(__name__)

KEY_MODES = ("rome", "prompt", "averaged")


@dataclass
class ROMEConfig:
    """ROME hyper-parameters (reference names in parentheses).

    Attributes:
        layer: the edited layer (``layers[0]``); ``None`` picks ~1/4 of the depth (:func:`kedit.core.config.auto_layers`).
        v_lr, v_steps, v_weight_decay, clamp_norm_factor, kl_factor: target optimisation (``v_*``).
        mom2_adjustment: weight the update by C⁻¹ (the paper); ``False`` uses C = I.
        mom2_n_tokens: tokens of the statistics corpus used for C.
        mom2_ridge: ridge added to C before solving (0 = the paper).
        key_mode: ``"rome"`` | ``"prompt"`` | ``"averaged"`` (see module docstring).
        context_lengths: ``((n_tokens, count), ...)`` of the sampled context templates (plus the plain prompt).
    """

    layer: int | None = None
    v_lr: float = 0.5
    v_steps: int = 20
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    mom2_adjustment: bool = True
    mom2_n_tokens: int = 100_000
    mom2_ridge: float = 0.0
    key_mode: str = "rome"
    context_lengths: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))


def _rome_presets(model) -> dict:
    return preset_for("rome", model)


def _rrome_presets(model) -> dict:
    return {**preset_for("rome", model), "key_mode": "prompt"}


@torch.no_grad()
def _layer_io(model, tok, adapter, layer, req: EditRequest, templates: Sequence[str]):
    """Keys ``[n_templates, d_k]`` and outputs ``[n_templates, d]`` of ``mlp_out`` at the subject's last token."""
    texts, spans = zip(*(prompt_text(t, req) for t in templates))
    keys, outs = compute_keys(model, tok, adapter, [layer], list(texts), list(spans), with_outputs=True)
    return keys[layer], outs[layer]


def compute_rome(
    model, tok, requests: Sequence[EditRequest], config: ROMEConfig, ctx: EditContext | None = None
) -> EditDelta:
    """Compute the ROME delta for ``requests`` (inserted one after another). The model is left unchanged."""
    ctx = ctx or EditContext()
    if config.key_mode not in KEY_MODES:
        raise ValueError(f"key_mode must be one of {KEY_MODES}, got {config.key_mode!r}")
    adapter = get_adapter(model)
    if config.layer is not None:
        layer = config.layer
    else:
        (layer,) = auto_layers(adapter.num_layers(model), count=1, last_at=SINGLE_LAYER_AT)
    layer = adapter.check_layer(model, layer)
    module = adapter.module(model, "mlp_out", layer)
    param_name = adapter.weight_name("mlp_out", layer)
    C = None
    if config.mom2_adjustment:
        C = ctx.second_moments(model, tok, [layer], n_tokens=config.mom2_n_tokens)[layer].mean
    templates = ctx.context_templates(model, tok, config.context_lengths)
    tcfg = target_config(config)
    weight = module.weight
    original = weight.detach().clone()
    lefts, rights, diagnostics = [], [], []
    try:
        for i, req in enumerate(requests):
            keys, outs = _layer_io(model, tok, adapter, layer, req, templates)
            k_star, k_e = keys.mean(0), keys[0]
            site = Site("mlp_out", layer)
            with torch.enable_grad():
                res = optimize_targets(model, tok, adapter, [req], [site], tcfg, templates)
            delta = res.delta[site][0]
            if config.key_mode == "averaged":
                # r-ROME random-prefix keys: v* against the mean output over the templates (the mean key's output)
                u_src, k_den = k_star, k_star
                residual = res.target(site)[0].double() - outs.mean(0).double().to(delta.device)
            else:
                u_src, k_den = {"rome": (k_star, k_e), "prompt": (k_e, k_e)}[config.key_mode]
                residual = delta
            r, u = rome_rank_one(
                None if C is None else C.to(u_src.device),  # C lives on the CPU (StatsCache); the keys do not
                u_src,
                k_den,
                residual.to(u_src.device),
                ridge=config.mom2_ridge,
                what=f"ROME layer {layer}",
            )
            lefts.append(r)
            rights.append(u)
            diagnostics.append(
                {
                    "case_id": req.case_id,
                    "v_loss": float(res.loss[0]),
                    "v_nll": float(res.nll[0]),
                    "v_steps": int(res.steps[0]),
                    "delta_norm": float(delta.norm()),
                    "residual_norm": float(residual.norm()),
                    "v0_norm": float(res.init[site][0].norm()),
                }
            )
            if i < len(requests) - 1:  # later requests see this one, as in the reference loop (rounded as apply)
                with torch.no_grad():
                    add_in_place(module, r[:, None], u[None, :])
            if ctx.progress is not None:
                ctx.report("rome", i + 1, len(requests))
    finally:
        with torch.no_grad():
            weight.copy_(original)
    # [d, n] and [n, d_k] on the weight's device, fp32 (fp64 for an fp64 weight)
    left, right = factors_for(weight, torch.stack(lefts, dim=1), torch.stack(rights, dim=0))
    update = LowRankUpdate.from_math(model, param_name, left, right)
    out = EditDelta.for_model(
        model,
        [update],
        method="r-rome" if config.key_mode != "rome" else "rome",
        config={**asdict(config), "layer": layer},
        requests=[r.to_dict() for r in requests],
    )
    out.meta["diagnostics"] = diagnostics
    return out


_PAPER = "Meng et al., Locating and Editing Factual Associations in GPT, NeurIPS 2022"
register_method(
    "rome",
    config=ROMEConfig,
    compute=compute_rome,
    paper=_PAPER,
    summary="rank-one update of one MLP output projection, covariance-weighted",
    presets=_rome_presets,
    batched=False,
)
register_method(
    "r-rome",
    config=ROMEConfig,
    compute=compute_rome,
    paper="Gupta et al., Rebuilding ROME: Resolving Model Collapse during Sequential Model Editing, 2024; " + _PAPER,
    summary="ROME with consistent keys (key_mode='prompt')",
    presets=_rrome_presets,
    batched=False,
)
