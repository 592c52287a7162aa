"""LoRA fine-tuning baseline, trained with :mod:`peft` and exported as kedit low-rank deltas.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022 (EasyEdit's LoRA baseline). LoRA
itself is **not** re-implemented here: :func:`peft.get_peft_model` injects the adapters (``fan_in_fan_out`` for
GPT-2's ``Conv1D``), the adapter is trained with the FT-M objective (:mod:`kedit.methods.ft.objective`;
``loss="prompt_last"`` gives the FT-L objective), and each trained pair is converted to a
:class:`~kedit.deltas.LowRankUpdate` ``ΔW = scaling · B A`` (math orientation ``[out, in]``: ``B = lora_B [out, r]``,
``A = lora_A [r, in]``; :meth:`LowRankUpdate.from_math` transposes for ``Conv1D``). The delta therefore goes through
the same apply / exact revert / save / load as every other kedit edit, and can be merged.

**The model is left bit-identical and free of peft wrappers.** The adapters are removed with
``PeftModel.unload()`` (no merge: the original module objects come back), the ``requires_grad`` flags peft turned
off and the train/eval mode are restored, and compute verifies that every wrapped module is the original object
again with unchanged weights. The LoRA init (``A`` Kaiming-uniform, ``B = 0``) is seeded from ``ctx.seed`` inside
a forked RNG, so results are deterministic and the global RNG is untouched.

peft is an optional dependency: ``pip install 'kedit[lora]'``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from kedit.arch import get_adapter, is_transposed
from kedit.core.batching import check_conflicts, device_of
from kedit.core.context import EditContext
from kedit.core.walk import factors_for
from kedit.deltas import EditDelta, LowRankUpdate
from kedit.fingerprint import tensor_fingerprint
from kedit.methods.ft import resolve_projections
from kedit.methods.ft.objective import LOSSES, build_loss_batches, keep_grad_flags, train_adam
from kedit.methods.presets import preset_for
from kedit.methods.registry import register_method
from kedit.requests import EditRequest

__all__ = ["LoRAConfig", "compute_lora", "lora_factors"]

log = logging.getLogger(__name__)

_ADAPTER_NAME = "kedit_edit"


@dataclass
class LoRAConfig:
    """LoRA hyper-parameters (EasyEdit names in parentheses).

    Attributes:
        layers: layers to adapt; ``None`` = every layer.
        slots: projections to adapt (kedit slots, e.g. ``("mlp_out",)`` or ``("attn_out", "mlp_out")``); EasyEdit
            targets ``q_proj``/``v_proj``, which have no architecture-neutral slot (GPT-2 fuses q, k, v).
        rank: LoRA rank ``r`` (``rank``, 8).
        alpha: ``lora_alpha`` (32); scaling = alpha / r (alpha / √r with ``use_rslora``).
        use_rslora: rank-stabilised scaling.
        loss: ``"target_new"`` (FT-M objective, default) or ``"prompt_last"`` (FT-L objective).
        lr, epochs, weight_decay: Adam (``lr`` 5e-3, ``num_steps`` 70, ``weight_decay`` 0).
        batch_size: requests per mini-batch; ``None`` = all in one batch.
        skip_step_loss, early_stop_loss: as in FT (no step below / stop below; 0 disables).
    """

    layers: tuple[int, ...] | None = None
    slots: tuple[str, ...] = ("mlp_out",)
    rank: int = 8
    alpha: float = 32.0
    use_rslora: bool = False
    loss: str = "target_new"
    lr: float = 5e-3
    epochs: int = 70
    weight_decay: float = 0.0
    batch_size: int | None = None
    skip_step_loss: float = 0.0
    early_stop_loss: float = 1e-2


def _require_peft():
    try:
        import peft
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "the 'lora' method needs the optional dependency peft: pip install 'kedit[lora]'"
        ) from e
    return peft


def _tuner_layers(model, peft) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def lora_factors(
    model, paths: Sequence[str], adapter_name: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{path: (left [out, r], right [r, in])}`` with ``ΔW_math = left @ right = scaling · B A`` for each peft LoRA
    layer at ``paths`` (read while the adapters are injected; copies).

    peft keeps ``lora_A.weight`` as ``[r, in]`` and ``lora_B.weight`` as ``[out, r]`` in math orientation for both
    ``nn.Linear`` and ``Conv1D`` (``fan_in_fan_out`` only transposes the *base* weight), so no transpose is needed
    here; :meth:`LowRankUpdate.from_math` converts to the storage orientation of the original module.

    The copies are on the base weight's device, fp32 (fp64 for an fp64 base weight, as the delta is applied in).
    """
    out = {}
    for p in paths:
        layer = model.get_submodule(p)
        w = layer.get_base_layer().weight
        A = layer.lora_A[adapter_name].weight.detach()
        B = layer.lora_B[adapter_name].weight.detach()
        scale = float(layer.scaling[adapter_name])
        left, right = factors_for(w, B, A)
        out[p] = (scale * left, right.clone())
    return out


def compute_lora(
    model, tok, requests: Sequence[EditRequest], config: LoRAConfig, ctx: EditContext | None = None
) -> EditDelta:
    """Train a LoRA adapter on ``requests`` with peft and return it as low-rank deltas (model left unchanged)."""
    peft = _require_peft()
    ctx = ctx or EditContext()
    if config.loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {config.loss!r}")
    if config.rank < 1 or config.epochs < 1 or not config.lr > 0:
        raise ValueError(
            f"need rank ≥ 1, epochs ≥ 1 and lr > 0 (got {config.rank}, {config.epochs}, {config.lr})"
        )
    if not requests:
        raise ValueError("no edit requests given")
    check_conflicts(requests, "LoRA")
    if not config.slots:
        raise ValueError("slots must name at least one projection")
    adapter = get_adapter(model)
    n_layers = adapter.num_layers(model)
    targets = resolve_projections(
        model, adapter, list(config.slots), config.layers, default_layers=range(n_layers)
    )
    if _tuner_layers(model, peft):
        raise ValueError(
            "the model already carries peft adapters; merge or unload them before editing with LoRA"
        )
    device = device_of(model)
    batches = build_loss_batches(tok, requests, config.loss, device, config.batch_size)

    paths = [path for _, _, path in targets]
    originals = {p: model.get_submodule(p) for p in paths}
    fingerprints = {p: tensor_fingerprint(m.weight) for p, m in originals.items()}
    transposed = {p: is_transposed(m) for p, m in originals.items()}
    lcfg = peft.LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=0.0,
        target_modules=paths,
        fan_in_fan_out=all(transposed.values()),
        bias="none",
        use_rslora=config.use_rslora,
        init_lora_weights=True,
    )
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with keep_grad_flags(model):
        # fork the RNG of the model's own device type too (no device name is assumed)
        accel = device.type != "cpu"
        with torch.random.fork_rng(devices=[device] if accel else [], device_type=device.type), \
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
            torch.manual_seed(ctx.seed)
            peft_model = peft.get_peft_model(model, lcfg, adapter_name=_ADAPTER_NAME)
        try:
            model.eval()
            params = [p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n]
            if not params:
                raise RuntimeError("peft created no trainable LoRA parameters")

            def logits_fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                return model(input_ids=ids, attention_mask=mask).logits  # the wrapped modules are live

            with torch.enable_grad():
                result = train_adam(
                    params,
                    logits_fn,
                    batches,
                    n_requests=len(requests),
                    lr=config.lr,
                    epochs=config.epochs,
                    weight_decay=config.weight_decay,
                    skip_step_loss=config.skip_step_loss,
                    early_stop_loss=config.early_stop_loss,
                    progress=lambda d, t: ctx.report("lora", d, t),
                )
            factors = lora_factors(model, paths, _ADAPTER_NAME)
        finally:
            peft_model.unload()  # no merge: the original modules come back unchanged
    leftovers = _tuner_layers(model, peft)
    moved = [p for p, m in originals.items() if model.get_submodule(p) is not m]
    changed = [p for p, m in originals.items() if tensor_fingerprint(m.weight) != fingerprints[p]]
    if leftovers or moved or changed:
        raise RuntimeError(
            f"peft did not restore the model (wrappers left: {leftovers}, replaced: {moved}, changed: {changed})"
        )
    updates = [
        LowRankUpdate.from_math(model, f"{p}.weight", left, right) for p, (left, right) in factors.items()
    ]
    out = EditDelta.for_model(
        model,
        updates,
        method="lora",
        config={**asdict(config), "layers": sorted({layer for _, layer, _ in targets})},
        requests=[r.to_dict() for r in requests],
    )
    out.meta["diagnostics"] = {
        "epochs": result.epochs,
        "steps": result.steps,
        "loss": result.loss,
        "request_loss": result.request_loss,
        "history": result.history,
    }
    return out


def _presets(model) -> dict:
    return preset_for("lora", model)


register_method(
    "lora",
    config=LoRAConfig,
    compute=compute_lora,
    paper="Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, ICLR 2022",
    summary="LoRA adapter trained with peft on the FT-M loss, exported as low-rank deltas",
    presets=_presets,
)
