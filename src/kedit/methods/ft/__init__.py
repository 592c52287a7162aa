"""FT-L and FT-M: constrained fine-tuning of one (or a few) MLP matrices.

Zhu, Rawat, Zaheer, Bhojanapalli, Li, Yu, Kumar, "Modifying Memories in Transformer Models", arXiv 2012.00363
(the L∞-constrained fine-tuning baseline used by ROME, Meng et al. 2022); FT-M is EasyEdit's teacher-forced
variant (Wang et al., "EasyEdit", ACL 2024 demo; Zhang et al., "A Comprehensive Study of Knowledge Editing for
LLMs", 2024). METHODS.md §1.

The chosen weight matrices (``slot`` at each of ``layers``; by default ``mlp_out`` of the middle layer) are trained
with Adam on one of the two objectives of :mod:`kedit.methods.ft.objective`:

* ``"ft-l"``: ``loss="prompt_last"`` -- every target token scored at the last prompt position;
* ``"ft-m"``: ``loss="target_new"`` -- teacher-forced CE over the target tokens, prompt masked.

After every step the change is clamped elementwise to ``[−ε, ε]`` (``norm_constraint``; ``None`` = unconstrained).

**The model is never touched.** Training runs on a separate tensor ``D`` (fp32; fp64 for fp64 weights) (the change ``ΔW``) through
``torch.func.functional_call(model, {name: W₀ + D})``; the model's parameters keep their values, ``requires_grad``
flags and train/eval mode, and the result is a :class:`~kedit.deltas.DenseUpdate` ``ΔW = D`` per parameter (so
``‖ΔW‖∞ ≤ ε`` holds exactly for the delta). Requests are batched (``batch_size`` per mini-batch, all by default).

Deliberate differences from the reference (EasyEdit ``execute_ft``):

* targets are tokenised without BOS (the reference trains Llama's FT-L to predict ``<s>``);
* FT-M builds ``prompt ids + target ids`` instead of masking "pads + prompt length" of the joint string;
* ``weight_decay`` decays the change ``ΔW`` toward 0 (i.e. ``W`` toward ``W₀``), not ``W`` toward 0;
* the model runs in eval mode (no dropout), so the result is deterministic.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch.func import functional_call

from kedit.arch import ArchAdapter, get_adapter, is_transposed
from kedit.core.batching import check_conflicts, device_of
from kedit.core.context import EditContext
from kedit.deltas import DenseUpdate, EditDelta
from kedit.deltas.ledger import compute_dtype
from kedit.methods.ft.objective import LOSSES, build_loss_batches, keep_grad_flags, train_adam
from kedit.methods.presets import preset_for
from kedit.methods.registry import register_method
from kedit.requests import EditRequest

__all__ = ["PROJECTION_SLOTS", "FTConfig", "FTLConfig", "FTMConfig", "compute_ft", "resolve_projections"]

log = logging.getLogger(__name__)

#: slots whose module is a Linear / Conv1D projection that FT and LoRA may train
PROJECTION_SLOTS = ("mlp_out", "mlp_in", "mlp_gate", "attn_out")


@dataclass
class FTConfig:
    """Fine-tuning hyper-parameters (EasyEdit names in parentheses).

    Attributes:
        layers: layers whose ``slot`` matrix is trained; ``None`` = the middle layer ``round((L−1)/2)``.
        slot: the projection to train: ``"mlp_out"`` (default, ``rewrite_module_tmp``), ``"mlp_in"``,
            ``"mlp_gate"`` or ``"attn_out"``.
        loss: ``"prompt_last"`` (FT-L) or ``"target_new"`` (FT-M) (``objective_optimization``).
        lr: Adam learning rate (``lr``, 5e-4).
        epochs: passes over the requests (``num_steps``, 25).
        weight_decay: Adam L2 on the change ΔW (``weight_decay``, 0).
        norm_constraint: ε of the elementwise clamp ``|ΔW| ≤ ε``; ``None`` = unconstrained.
        batch_size: requests per mini-batch; ``None`` = all requests in one batch.
        skip_step_loss: no step on a batch whose loss is below this (1e-2).
        early_stop_loss: stop when an epoch's mean loss is below this (1e-2).
        train_bias: also train the projection's bias, if it has one (the reference does when its module template
            lacks ``.weight``); the bias is clamped with the same ε.
    """

    layers: tuple[int, ...] | None = None
    slot: str = "mlp_out"
    loss: str = "target_new"
    lr: float = 5e-4
    epochs: int = 25
    weight_decay: float = 0.0
    norm_constraint: float | None = None
    batch_size: int | None = None
    skip_step_loss: float = 1e-2
    early_stop_loss: float = 1e-2
    train_bias: bool = False


@dataclass
class FTLConfig(FTConfig):
    """:class:`FTConfig` with the FT-L objective (bag of target tokens at the last prompt position)."""

    loss: str = "prompt_last"


@dataclass
class FTMConfig(FTConfig):
    """:class:`FTConfig` with the FT-M objective (teacher-forced CE over the target, prompt masked)."""

    loss: str = "target_new"


def _middle_layer(n_layers: int) -> int:
    return max(0, round((n_layers - 1) / 2))


def resolve_projections(
    model,
    adapter: ArchAdapter,
    slots: Sequence[str],
    layers: Sequence[int] | None,
    *,
    default_layers: Sequence[int],
) -> list[tuple[str, int, str]]:
    """``[(slot, layer, module_path)]`` for every (slot, layer), validated (clear errors, nothing touched)."""
    out = []
    if layers is not None and len(layers) == 0:
        raise ValueError("layers must name at least one layer (or be None for the default)")
    chosen = list(default_layers if layers is None else layers)
    for slot in slots:
        if slot not in PROJECTION_SLOTS:
            raise ValueError(f"slot {slot!r} cannot be trained; choose one of {PROJECTION_SLOTS}")
        for layer in chosen:
            idx = adapter.check_layer(model, layer)
            try:
                module = adapter.module(model, slot, idx)
            except ValueError as e:
                raise ValueError(f"layer {idx}: {e}") from None
            try:
                is_transposed(module)
            except TypeError as e:
                raise ValueError(f"slot {slot!r} at layer {idx}: {e}") from None
            entry = (slot, idx, adapter.path(slot, idx))
            if entry not in out:
                out.append(entry)
    return out


def _check_common(config: FTConfig) -> None:
    if config.loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {config.loss!r}")
    if config.epochs < 1:
        raise ValueError(f"epochs must be ≥ 1, got {config.epochs}")
    if not config.lr > 0:
        raise ValueError(f"lr must be > 0, got {config.lr}")
    if config.norm_constraint is not None and not config.norm_constraint >= 0:
        raise ValueError(f"norm_constraint must be ≥ 0 or None, got {config.norm_constraint}")


def compute_ft(
    model, tok, requests: Sequence[EditRequest], config: FTConfig, ctx: EditContext | None = None
) -> EditDelta:
    """Fine-tune the chosen matrices on ``requests``; returns dense deltas. The model is left bit-identical."""
    ctx = ctx or EditContext()
    _check_common(config)
    if not requests:
        raise ValueError("no edit requests given")
    check_conflicts(requests, "FT")
    adapter = get_adapter(model)
    n_layers = adapter.num_layers(model)
    targets = resolve_projections(
        model, adapter, [config.slot], config.layers, default_layers=[_middle_layer(n_layers)]
    )
    device = device_of(model)
    batches = build_loss_batches(tok, requests, config.loss, device, config.batch_size)

    names: list[str] = []
    for _, _, path in targets:
        names.append(f"{path}.weight")
        if config.train_bias and getattr(model.get_submodule(path), "bias", None) is not None:
            names.append(f"{path}.bias")
    base = {n: model.get_parameter(n).detach() for n in names}
    # the trainable change ΔW on the parameter's device, in the dtype apply adds it in: fp32 for fp32/fp16/bf16
    # weights, fp64 for fp64 ones (an fp64 W₀ is never rounded to fp32 on the way)
    deltas = {
        n: torch.zeros(p.shape, dtype=compute_dtype(p.dtype), device=p.device, requires_grad=True)
        for n, p in base.items()
    }
    eps = config.norm_constraint

    def logits_fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = {n: (base[n].to(deltas[n].dtype) + deltas[n]).to(base[n].dtype) for n in names}
        out = functional_call(
            model, weights, args=(), kwargs={"input_ids": ids, "attention_mask": mask}, strict=False
        )
        return out.logits

    def clamp() -> None:
        if eps is None:
            return
        with torch.no_grad():
            for d in deltas.values():
                d.clamp_(-eps, eps)

    with keep_grad_flags(model, freeze=True), torch.enable_grad():
        result = train_adam(
            list(deltas.values()),
            logits_fn,
            batches,
            n_requests=len(requests),
            lr=config.lr,
            epochs=config.epochs,
            weight_decay=config.weight_decay,
            skip_step_loss=config.skip_step_loss,
            early_stop_loss=config.early_stop_loss,
            after_step=clamp,
            progress=lambda d, t: ctx.report("ft", d, t),
        )
    updates = [DenseUpdate(n, deltas[n].detach().clone()) for n in names]
    out = EditDelta.for_model(
        model,
        updates,
        method="ft-l" if config.loss == "prompt_last" else "ft-m",
        config={**asdict(config), "layers": [layer for _, layer, _ in targets]},
        requests=[r.to_dict() for r in requests],
    )
    out.meta["diagnostics"] = {
        "epochs": result.epochs,
        "steps": result.steps,
        "loss": result.loss,
        "request_loss": result.request_loss,
        "history": result.history,
    }
    log.debug(
        "%s: %d epochs, %d steps, final loss %.4g", out.method, result.epochs, result.steps, result.loss
    )
    return out


def _presets(model) -> dict:
    return preset_for("ft", model)


_PAPER = (
    "Zhu et al., Modifying Memories in Transformer Models, arXiv 2012.00363 (2020); "
    "FT-M: Zhang et al., A Comprehensive Study of Knowledge Editing for Large Language Models, 2024"
)
register_method(
    "ft-l",
    config=FTLConfig,
    compute=compute_ft,
    paper=_PAPER,
    summary="L∞-constrained fine-tuning of one MLP matrix, bag-of-tokens loss at the last prompt token",
    presets=_presets,
)
register_method(
    "ft-m",
    config=FTMConfig,
    compute=compute_ft,
    paper=_PAPER,
    summary="fine-tuning of one MLP matrix, teacher-forced CE on the target tokens (prompt masked)",
    presets=_presets,
)
