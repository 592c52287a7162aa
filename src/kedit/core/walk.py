"""The one "walk the layers" driver shared by MEMIT, PMET, AlphaEdit, EMMET and their BLUE variants (the fields
their configs share are :class:`kedit.core.config.LocateEditConfig`).

All of these methods (MEMIT, Meng et al. ICLR 2023, §4.3 and Alg. 1) do the same thing and differ in three
parameters only:

* **where the target lives** -- the sites whose δ is optimised (:func:`kedit.core.targets.optimize_targets`) and the
  *value site* whose output is the target: the block output (MEMIT, AlphaEdit, EMMET) or the MLP output next to an
  attention output (PMET);
* **the per-layer solve** ``(layer, K [d_k, n], R_j [d, n]) -> (left [d, r], right [r, d_k])``: ridge, null-space or
  equality-constrained (:mod:`kedit.core.solve`);
* **the plan**: a list of :class:`Stage` s. The default plan spreads a residual computed at the last layer over the
  layers with fraction ``1/(L−j+1)`` (MEMIT) or ``1/√(L−j+1)`` (PMET); BLUE's plan (:mod:`kedit.methods.blue`)
  edits only the first and last layers, re-optimising the target at each and using the whole residual.

For each stage, on the model with the previous stages' updates applied **in place** (restored bit-identically in
``finally``): optimise targets if the stage asks for it, compute the keys ``K_j`` at the stage's layer and the
current value ``H`` at the value site (plain prompts), ``R_j = fraction · (Z − H)``, solve, add ``Δ_j`` to the
weight. The result is one low-rank factor pair per edited layer (rank ≤ n).

Keys follow the MEMIT reference: ``k = mean over template groups of (mean within the group)``, the plain prompt
``"{}"`` being a group of its own -- so with the default templates ``k = ½ k_plain + ½ mean(k_prefixed)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kedit.arch import ArchAdapter, math_weight
from kedit.core.batching import check_conflicts, device_of, pad_batch, pad_id
from kedit.core.config import LocateEditConfig, auto_layers, target_config
from kedit.core.context import EditContext
from kedit.core.keys import compute_keys, encode_with_subject, gather_at, target_ids
from kedit.core.targets import Site, TargetConfig, optimize_targets, prompt_text
from kedit.deltas.ledger import compute_dtype, pristine_weights
from kedit.hooks import trace
from kedit.requests import EditRequest

__all__ = [
    "SPREAD_RULES",
    "Stage",
    "Walk",
    "WalkResult",
    "add_in_place",
    "anchor_norms",
    "anchor_targets",
    "covariances",
    "factors_for",
    "group_sizes",
    "make_delta",
    "request_keys",
    "resolve_layers",
    "run_walk",
    "site_values",
    "spread_fraction",
    "spread_stages",
    "validate_requests",
    "walk_layers",
]

log = logging.getLogger(__name__)

#: residual spreading rules: MEMIT ``1/(L−j+1)``, PMET ``1/√(L−j+1)``, none (BLUE)
SPREAD_RULES = ("linear", "sqrt", "none")

Factors = tuple[torch.Tensor, torch.Tensor]
SolveFn = Callable[[int, torch.Tensor, torch.Tensor], Factors]


def spread_fraction(rule: str, step: int, total: int) -> float:
    """Fraction of the remaining residual assigned to stage ``step`` (0-based) of ``total``.

    ``"linear"``: ``1/(total − step)`` = MEMIT's ``1/(L − j + 1)`` with 1-based ``j``; ``"sqrt"``: its square root
    (PMET); ``"none"``: 1.
    """
    if not 0 <= step < total:
        raise ValueError(f"step {step} out of range for {total} stages")
    remaining = total - step
    if rule == "linear":
        return 1.0 / remaining
    if rule == "sqrt":
        return 1.0 / math.sqrt(remaining)
    if rule == "none":
        return 1.0
    raise ValueError(f"spread rule must be one of {SPREAD_RULES}, got {rule!r}")


@dataclass(frozen=True)
class Stage:
    """One step of the walk: update ``mlp_out`` at ``layer`` with ``fraction`` of the residual measured at
    ``target_layer``; ``retarget`` re-optimises the targets (on the current, partially edited model) first."""

    layer: int
    target_layer: int
    fraction: float
    retarget: bool


def spread_stages(layers: Sequence[int], rule: str) -> list[Stage]:
    """MEMIT-style plan: targets optimised once at the last layer, residual spread with ``rule``."""
    z = layers[-1]
    return [Stage(l, z, spread_fraction(rule, j, len(layers)), j == 0) for j, l in enumerate(layers)]


def resolve_layers(
    model: nn.Module, adapter: ArchAdapter, layers: Sequence[int] | None, name: str
) -> list[int]:
    """Checked, sorted, de-duplicated non-negative layer indices (``None``: :func:`auto_layers`)."""
    if layers is None:
        return list(auto_layers(adapter.num_layers(model)))
    if isinstance(layers, int):
        layers = (layers,)
    if len(layers) == 0:
        raise ValueError(
            f"{name}: layers is empty; give at least one layer (or None for the automatic choice)"
        )
    try:
        checked = [adapter.check_layer(model, layer) for layer in layers]
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return sorted(set(checked))


def validate_requests(tok, requests: Sequence[EditRequest], name: str) -> None:
    """Fail early, naming the request, on a target that tokenizes to nothing, a subject not found, or two requests
    asking the same prompt for different targets (:func:`kedit.core.batching.check_conflicts`)."""
    if not requests:
        raise ValueError(f"{name}: no edit requests given")
    check_conflicts(requests, name)
    for i, req in enumerate(requests):
        ident = f"request #{i}" + (f" (case {req.case_id})" if req.case_id is not None else "")
        try:
            target_ids(tok, req.target_new)
            encode_with_subject(tok, [req.text], [req.subject_span])
        except ValueError as e:
            raise ValueError(f"{name}: {ident}: {e}") from None


def _template_groups(templates: Sequence[str], group_sizes: Sequence[int] | None) -> list[int]:
    t = len(templates)
    if group_sizes and sum(group_sizes) == t and group_sizes[0] == 1:
        return list(group_sizes)
    return [1] if t == 1 else [1, t - 1]


@torch.no_grad()
def request_keys(
    model: nn.Module,
    tok,
    adapter: ArchAdapter,
    layers: Sequence[int],
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    *,
    group_sizes: Sequence[int] | None = None,
) -> dict[int, torch.Tensor]:
    """MEMIT keys ``{layer: [n, d_k]}`` (fp32): each request's key averaged within, then across, template groups
    (``templates[0] == "{}"`` is its own group; ``group_sizes`` splits the rest, default one group), all layers in
    one forward pass per batch (:func:`kedit.core.keys.compute_keys`)."""
    texts, spans = [], []
    for req in requests:
        for t in templates:
            text, span = prompt_text(t, req)
            texts.append(text)
            spans.append(span)
    keys = compute_keys(model, tok, adapter, list(layers), texts, spans)
    groups = _template_groups(templates, group_sizes)
    n, T = len(requests), len(templates)
    out = {}
    for layer, k in keys.items():
        k = k.view(n, T, -1)
        parts, start = [], 0
        for g in groups:
            parts.append(k[:, start : start + g].mean(1))
            start += g
        out[layer] = torch.stack(parts, 0).mean(0)
    return out


@torch.no_grad()
def site_values(
    model: nn.Module,
    tok,
    adapter: ArchAdapter,
    site: Site,
    requests: Sequence[EditRequest],
    *,
    batch_size: int = 64,
) -> torch.Tensor:
    """Output of ``site`` at the subject's last token of each request's plain prompt, ``[n, d]`` fp32 -- the
    current ``h^l`` (block) or ``m^l`` (mlp_out) the residual is measured against. Same tokenization as the
    target optimiser's ``v_0``."""
    texts, spans = zip(*(prompt_text("{}", r) for r in requests))
    enc = encode_with_subject(tok, list(texts), list(spans))
    path = adapter.path(site.slot, site.layer)
    device = device_of(model)
    out = []
    for b in range(0, len(enc), batch_size):
        chunk = enc[b : b + batch_size]
        ids, mask = pad_batch([e.ids for e in chunk], pad_id(tok), device)
        idx = torch.tensor([e.subject_last for e in chunk], device=device)
        with trace(model, [path], stop=True) as tr:
            model(input_ids=ids, attention_mask=mask)
        out.append(gather_at(tr[path].output, idx).float())
    return torch.cat(out)


def anchor_norms(
    model: nn.Module, tok, adapter: ArchAdapter, site: Site, requests: Sequence[EditRequest]
) -> torch.Tensor:
    """NAS's reference norms (Liu et al., "Norm Anchors Make Model Edits Last", arXiv 2602.02543): ``‖v0_i‖`` of
    each request's value at ``site`` (:func:`site_values`) on the **original** model -- every parameter touched by
    an applied delta swapped back to its rollback-ledger base copy for the forward pass
    (:func:`kedit.deltas.ledger.pristine_weights`), then restored bitwise. ``[n]`` fp32."""
    with pristine_weights(model):
        return site_values(model, tok, adapter, site, requests).norm(dim=-1)


def anchor_targets(Z: torch.Tensor, ref: torch.Tensor, name: str = "norm anchor") -> torch.Tensor:
    """``z_i · ref_i / ‖z_i‖`` (NAS): each target keeps its direction and takes the reference norm."""
    norms = Z.norm(dim=-1, keepdim=True)
    if not bool((norms > 0).all()) or not bool(torch.isfinite(norms).all()):
        raise ValueError(f"{name}: a target value vector has zero or non-finite norm; it cannot be rescaled")
    return Z * (ref.to(Z.device, Z.dtype)[:, None] / norms)


@dataclass
class Walk:
    """The method-specific parts of a walk.

    Attributes:
        name: method name used in messages (``"MEMIT"``).
        target_sites: ``fn(target_layer) -> sites`` whose δ is optimised.
        value_site: ``fn(target_layer) -> site`` whose optimised output is the target Z (one of ``target_sites``).
        solve: ``fn(layer, K [d_k, n] fp64, R_j [d, n] fp64) -> (left [d, r], right [r, d_k])``.
        after: optional ``fn(model)`` run with **all** updates applied, before the weights are restored (AlphaEdit
            recomputes its keys on the edited model there); its return value is :attr:`WalkResult.after`.
    """

    name: str
    target_sites: Callable[[int], Sequence[Site]]
    value_site: Callable[[int], Site]
    solve: SolveFn
    after: Callable[[nn.Module], Any] | None = None


@dataclass
class WalkResult:
    factors: dict[int, Factors]  #: layer -> (left [d, r], right [r, d_k]) in math orientation, fp64
    diagnostics: dict[str, Any]  #: JSON scalars: per request target stats, per stage norms
    debug: dict[str, Any] | None = None  #: JSON lists of K, R, Z, H per stage (when asked)
    after: Any = None
    stages: list[Stage] = field(default_factory=list)


def _cols(t: torch.Tensor) -> list[list[float]]:
    return t.detach().double().cpu().tolist()


def walk_layers(
    model: nn.Module,
    tok,
    adapter: ArchAdapter,
    requests: Sequence[EditRequest],
    stages: Sequence[Stage],
    walk: Walk,
    tcfg: TargetConfig,
    templates: Sequence[str],
    *,
    ctx: EditContext,
    group_sizes: Sequence[int] | None = None,
    debug: bool = False,
    norm_anchor: bool = False,
) -> WalkResult:
    """Run ``stages`` (see the module docstring). The model is left bit-identical, whatever happens.

    ``norm_anchor`` (NAS): every optimised target is rescaled to its request's value norm on the original model
    (:func:`anchor_norms`, computed for all retargeting stages before any stage touches the weights)."""
    if not stages:
        raise ValueError(f"{walk.name}: no layers to edit")
    if len({s.layer for s in stages}) != len(stages):
        raise ValueError(f"{walk.name}: a layer appears twice in the plan {[s.layer for s in stages]}")
    if not stages[0].retarget:
        raise ValueError(f"{walk.name}: the first stage must optimise the targets")
    validate_requests(tok, requests, walk.name)
    modules = {s.layer: adapter.module(model, "mlp_out", s.layer) for s in stages}
    anchors: dict[Site, torch.Tensor] = {}
    if norm_anchor:
        for st in stages:
            if st.retarget:
                site = walk.value_site(st.target_layer)
                if site not in anchors:
                    anchors[site] = anchor_norms(model, tok, adapter, site, requests)
    originals = {layer: m.weight.detach().clone() for layer, m in modules.items()}
    factors: dict[int, Factors] = {}
    target_diag: list[dict[str, Any]] = []
    stage_diag: list[dict[str, Any]] = []
    dbg: list[dict[str, Any]] = []
    after_value = None
    Z = init = None
    vsite: Site | None = None
    try:
        for j, st in enumerate(stages):
            if st.retarget:
                sites = list(walk.target_sites(st.target_layer))
                vsite = walk.value_site(st.target_layer)
                with torch.enable_grad():
                    res = optimize_targets(model, tok, adapter, requests, sites, tcfg, templates)
                Z, init = res.target(vsite), res.init[vsite]
                if norm_anchor:
                    Z = anchor_targets(Z, anchors[vsite], f"{walk.name} norm anchor")
                for i, req in enumerate(requests):
                    target_diag.append(
                        {
                            "case_id": req.case_id,
                            "target_layer": st.target_layer,
                            "loss": float(res.loss[i]),
                            "nll": float(res.nll[i]),
                            "steps": int(res.steps[i]),
                            "delta_norm": float(res.delta[vsite][i].norm()),
                            "v0_norm": float(init[i].norm()),
                            "z_norm": float(Z[i].norm()),
                        }
                    )
            assert Z is not None and vsite is not None and init is not None
            K = request_keys(model, tok, adapter, [st.layer], requests, templates, group_sizes=group_sizes)[
                st.layer
            ]
            H = site_values(model, tok, adapter, vsite, requests)
            R = (Z.to(H.device) - H).double().T  # [d, n]
            Rj = st.fraction * R
            left, right = walk.solve(st.layer, K.double().T, Rj)
            module = modules[st.layer]
            with torch.no_grad():
                upd = add_in_place(module, left, right)
            factors[st.layer] = (left, right)
            stage_diag.append(
                {
                    "layer": st.layer,
                    "target_layer": st.target_layer,
                    "fraction": st.fraction,
                    "retarget": st.retarget,
                    "residual_norm": float(R.norm(dim=0).mean()),
                    "update_norm": float(upd.norm()),
                    "key_norm": float(K.norm(dim=1).mean()),
                }
            )
            if debug:
                dbg.append(
                    {
                        "layer": st.layer,
                        "target_layer": st.target_layer,
                        "fraction": st.fraction,
                        "K": _cols(K.T),
                        "R": _cols(Rj),
                        "Z": _cols(Z.T),
                        "H": _cols(H.T),
                        "v0": _cols(init.T),
                    }
                )
            ctx.report(walk.name.lower(), j + 1, len(stages))
        assert vsite is not None and Z is not None
        final = site_values(model, tok, adapter, vsite, requests)
        final_residual = float((Z.to(final.device) - final).norm(dim=-1).mean())
        if walk.after is not None:
            after_value = walk.after(model)
    finally:
        with torch.no_grad():
            for layer, module in modules.items():
                module.weight.copy_(originals[layer])
    diagnostics = {"targets": target_diag, "stages": stage_diag, "final_residual_norm": final_residual}
    return WalkResult(
        factors=factors,
        diagnostics=diagnostics,
        debug={"stages": dbg} if debug else None,
        after=after_value,
        stages=list(stages),
    )


def factors_for(param: torch.Tensor, *factors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``factors`` as an update of ``param`` is stored: on ``param``'s device, in the dtype its update is added in
    (fp32, fp64 for an fp64 parameter: :func:`kedit.deltas.ledger.compute_dtype`), so applying the delta moves and
    rounds nothing more than the final cast to the parameter's dtype."""
    dt = compute_dtype(param.dtype)
    return tuple(f.detach().to(device=param.device, dtype=dt) for f in factors)


def add_in_place(module: nn.Module, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Add ``left @ right`` (math orientation) to ``module.weight`` in place, rounded as
    :meth:`EditDelta.apply <kedit.deltas.EditDelta.apply>` rounds it (sum in fp32 -- fp64 for an fp64 weight --
    on the weight's device, then cast), so later stages see the model the applied delta gives. Returns the
    product (in that dtype, on that device)."""
    w = math_weight(module)
    left, right = factors_for(w, left, right)
    upd = left @ right
    w.copy_((w.to(upd.dtype) + upd).to(w.dtype))
    return upd


def group_sizes(config: LocateEditConfig, ctx: EditContext) -> list[int] | None:
    """Template groups of sampled templates (``[1, count, ...]``); ``None`` for injected ones."""
    if ctx.templates is not None:
        return None
    return [1] + [int(c) for _, c in config.context_lengths]


def covariances(ctx: EditContext, model: nn.Module, tok, layers: Sequence[int], n_tokens: int) -> dict:
    """``{layer: C}`` -- the uncentred second moments of the keys at ``layers`` (one pass, cached on ``ctx``)."""
    return {l: sm.mean for l, sm in ctx.second_moments(model, tok, layers, n_tokens=n_tokens).items()}


def run_walk(
    model: nn.Module,
    tok,
    adapter: ArchAdapter,
    requests: Sequence[EditRequest],
    stages: Sequence[Stage],
    walk: Walk,
    config: LocateEditConfig,
    ctx: EditContext,
    *,
    tcfg: TargetConfig | None = None,
    templates: Sequence[str] | None = None,
) -> WalkResult:
    """:func:`walk_layers` with the context templates, template groups, target config and debug flag taken
    from ``config`` / ``ctx`` -- the part every locate-then-edit method shares."""
    if templates is None:
        templates = ctx.context_templates(model, tok, config.context_lengths)
    return walk_layers(
        model,
        tok,
        adapter,
        requests,
        stages,
        walk,
        tcfg if tcfg is not None else target_config(config),
        templates,
        ctx=ctx,
        group_sizes=group_sizes(config, ctx),
        debug=config.debug,
        norm_anchor=bool(getattr(config, "norm_anchor", False)),
    )


def make_delta(
    model: nn.Module,
    adapter: ArchAdapter,
    result: WalkResult,
    *,
    method: str,
    config: Any,
    requests: Sequence[EditRequest],
    layers: Sequence[int],
    extra_meta: dict[str, Any] | None = None,
):
    """One :class:`~kedit.deltas.LowRankUpdate` (rank ≤ n) per edited ``mlp_out`` weight, on that weight's device,
    fp32 (fp64 for an fp64 weight; :func:`factors_for`)."""
    from dataclasses import asdict

    from kedit.deltas import EditDelta, LowRankUpdate

    updates = []
    for layer, (left, right) in sorted(result.factors.items()):
        name = adapter.weight_name("mlp_out", layer)
        updates.append(LowRankUpdate.from_math(model, name, *factors_for(model.get_parameter(name), left, right)))
    meta: dict[str, Any] = {"diagnostics": result.diagnostics, "edited_layers": sorted(result.factors)}
    if result.debug is not None:
        meta["debug"] = result.debug
    meta.update(extra_meta or {})
    return EditDelta.for_model(
        model,
        updates,
        method=method,
        config={**asdict(config), "layers": list(layers)},
        requests=[r.to_dict() for r in requests],
        meta=meta,
    )
