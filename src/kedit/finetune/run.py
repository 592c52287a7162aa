"""One forgetting-aware fine-tuning run on a LoRA adapter (peft), in two phases:

1. the general task (phase 1): LoRA training on text the model already knows; with ``regularize="si"`` the
   Synaptic-Intelligence path integral is accumulated inside the loop;
2. ``regularize="ewc"`` then runs the extra Fisher pass at the phase-1 end point: EWC-LoRA (Zheng et al., ICLR 2026),
   the Fisher of every adapted weight in its full ``[out, in]`` space and a pull of ``ΔW = s·B A`` towards the
   anchor's; ``regularize="ewc-ab"`` is the naive form (a Fisher per LoRA factor ``A`` and ``B``);
3. the domain (phase 2): LoRA training on the new text plus the importance penalty towards the phase-1 adapter
   (:class:`~kedit.finetune.regularizer.ImportancePenalty`), none with ``regularize="none"``.

All three share phase 1 and phase 2, so they differ only in the importances and the penalty. Training happens on a
deep copy; the model passed in is left bit-identical, and the change (both phases) comes back as a kedit
:class:`~kedit.deltas.EditDelta` of low-rank updates that applies, saves and reverts bitwise like an edit.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .importance import Importance, LoraView, SIAccumulator, fisher_diagonal, fisher_full_space, lora_deltas
from .regularizer import LAYER_COEFFS, ImportancePenalty

__all__ = ["REGULARIZERS", "FinetuneConfig", "FinetuneResult", "finetune", "measure_recall"]

logger = logging.getLogger(__name__)

REGULARIZERS = ("si", "ewc", "ewc-ab", "none")
Progress = Callable[[str, int, int], None]


@dataclass
class FinetuneConfig:
    """Settings of a run; sized for the testbed models (a few million parameters)."""

    regularize: str = "si"
    #: layer coefficients: "dynamic", "balanced", "static" or "none"; "" = the method's default (si: dynamic, ewc: none)
    layer_coeff: str = ""
    #: λ (static/none) or the penalty / task-loss ratio (dynamic); None = the method's default
    weight: float | None = None
    xi: float = 1e-3
    fisher_samples: int = 256
    phase1_epochs: float = 1.0
    phase1_lr: float = 3e-4
    phase2_epochs: float = 8.0
    phase2_lr: float = 1e-3
    batch_size: int = 16
    lora_rank: int = 8
    lora_alpha: float = 16.0
    #: module-name suffixes of the LoRA targets; empty: the MLP projections of every layer
    lora_targets: tuple[str, ...] = ()
    max_length: int = 64
    seed: int = 0

    #: the method defaults of ``weight`` and ``layer_coeff``
    DEFAULTS = {"si": (10.0, "dynamic"), "ewc": (1e4, "none"), "ewc-ab": (1e4, "none"), "none": (0.0, "none")}

    def resolved(self) -> FinetuneConfig:
        if self.regularize not in REGULARIZERS:
            raise ValueError(f"unknown regulariser {self.regularize!r}; expected one of {REGULARIZERS}")
        w, mode = self.DEFAULTS[self.regularize]
        out = dataclasses.replace(
            self,
            weight=w if self.weight is None else float(self.weight),
            layer_coeff=self.layer_coeff or mode,
            lora_targets=tuple(self.lora_targets),
        )
        if out.layer_coeff not in LAYER_COEFFS:
            raise ValueError(f"unknown layer_coeff {out.layer_coeff!r}; expected one of {LAYER_COEFFS}")
        for k in ("phase1_epochs", "phase2_epochs", "phase1_lr", "phase2_lr", "xi"):
            if not getattr(out, k) > 0:
                raise ValueError(f"{k} must be > 0, got {getattr(out, k)}")
        for k in ("batch_size", "lora_rank", "fisher_samples", "max_length"):
            if getattr(out, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(out, k)}")
        if out.weight < 0:
            raise ValueError(f"weight must be >= 0, got {out.weight}")
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    def replace(self, **kw: Any) -> FinetuneConfig:
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise ValueError(f"unknown fine-tuning setting(s) {unknown}; known: {sorted(names)}")
        return dataclasses.replace(self, **kw)


@dataclass
class FinetuneResult:
    delta: Any  # kedit.deltas.EditDelta
    log: dict[str, Any] = field(default_factory=dict)
    importance: Importance | None = None


def _encode(tok: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    if not texts:
        return []
    bos, eos = tok.bos_token_id, tok.eos_token_id
    ids = tok(list(texts), add_special_tokens=False)["input_ids"]
    out = [([bos] + x + [eos])[:max_length] for x in ids]
    return [x for x in out if len(x) > 1]


def _batch(rows: Sequence[list[int]], pad: int, device: Any) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def _batches(rows: list[list[int]], cfg: FinetuneConfig, epochs: float, seed: int) -> list[list[list[int]]]:
    rng = random.Random(seed)
    per_epoch = -(-len(rows) // cfg.batch_size)
    total = max(1, round(per_epoch * epochs))
    out: list[list[list[int]]] = []
    while len(out) < total:
        order = list(range(len(rows)))
        rng.shuffle(order)
        out.extend(
            [rows[j] for j in order[i : i + cfg.batch_size]] for i in range(0, len(order), cfg.batch_size)
        )
    return out[:total]


def _lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token NLL over the labelled tokens, computed here (not through ``model(labels=...)``, whose loss
    look-up warns on GPT-2's class name) -- the same value as the model's own causal-LM loss."""
    from kedit.unlearn.methods.losses import token_mean_nll

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return token_mean_nll(logits, batch["labels"])


def _lora_paths(model: Any, cfg: FinetuneConfig) -> dict[str, int]:
    """``{module path: layer index}`` of the LoRA targets."""
    from kedit.arch import get_adapter

    adapter = get_adapter(model)
    n_layers = adapter.num_layers(model)
    slots = [s for s in ("mlp_in", "mlp_gate", "mlp_out") if getattr(adapter, s, None)]
    by_layer = {adapter.path(s, i): i for i in range(n_layers) for s in slots}
    if not cfg.lora_targets:
        return by_layer
    modules = [n for n, _ in model.named_modules()]
    missing = [t for t in cfg.lora_targets if not any(n.endswith(t) for n in modules)]
    if missing:
        raise ValueError(f"LoRA target module(s) {missing} do not exist in this model")
    layer_prefixes = {i: adapter.path(slots[0], i).rsplit(".", 2)[0] + "." for i in range(n_layers)}
    out = {}
    for n in modules:
        if any(n.endswith(t) for t in cfg.lora_targets):
            layer = next((i for i, pre in layer_prefixes.items() if n.startswith(pre)), -1)
            out[n] = layer
    return out


def _train(
    model: Any,
    params: dict[str, torch.Tensor],
    batches: list[list[list[int]]],
    pad: int,
    lr: float,
    stage: str,
    progress: Progress | None,
    *,
    si: SIAccumulator | None = None,
    penalty: ImportancePenalty | None = None,
) -> dict[str, Any]:
    from kedit.core.batching import device_of

    dev = device_of(model)
    opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    model.train()
    losses, regs = [], []
    t0 = time.perf_counter()
    for step, rows in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        ce = _lm_loss(model, _batch(rows, pad, dev))
        loss = ce
        if penalty is not None:
            reg = penalty(params, ce)
            loss = ce + reg
            regs.append(float(reg.detach()))
        if not torch.isfinite(loss):
            raise RuntimeError(f"{stage}: the loss became {float(loss)} at step {step}")
        loss.backward()
        if si is not None:
            si.before_step()
        opt.step()
        if si is not None:
            si.after_step()
        losses.append(float(ce.detach()))
        if progress is not None:
            progress(stage, step + 1, len(batches))
    model.eval()
    log = {
        "steps": len(batches),
        "seconds": round(time.perf_counter() - t0, 3),
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }
    if regs:
        log["penalty_last"] = regs[-1]
    return log


def finetune(
    model: Any,
    tok: Any,
    phase1: Sequence[str],
    phase2: Sequence[str],
    config: FinetuneConfig | dict[str, Any] | None = None,
    *,
    progress: Progress | None = None,
) -> FinetuneResult:
    """Two-phase LoRA fine-tuning of a copy of ``model`` on ``phase1`` (general) then ``phase2`` (domain) texts.

    ``progress(stage, done, total)`` is called per step of the stages ``phase 1``, ``fisher`` (EWC) and ``phase 2``.
    Returns the delta (the model itself is not changed), a log with the time of every stage and the bytes of the
    stored importance state, and the importances.
    """
    import peft

    from kedit.arch import is_transposed
    from kedit.core.batching import pad_id
    from kedit.deltas import EditDelta, LowRankUpdate
    from kedit.fingerprint import model_fingerprint
    from kedit.methods.ft.objective import keep_grad_flags
    from kedit.methods.lora import lora_factors

    cfg = config if isinstance(config, FinetuneConfig) else FinetuneConfig().replace(**dict(config or {}))
    cfg = cfg.resolved()
    rows1 = _encode(tok, phase1, cfg.max_length)
    rows2 = _encode(tok, phase2, cfg.max_length)
    if not rows1:
        raise ValueError("phase 1 has no text")
    if not rows2:
        raise ValueError("phase 2 has no text")
    base_fp = model_fingerprint(model)
    pad = pad_id(tok)
    log: dict[str, Any] = {"config": cfg.to_dict(), "phase1_texts": len(rows1), "phase2_texts": len(rows2)}
    t_all = time.perf_counter()
    with keep_grad_flags(model, freeze=True):
        student = copy.deepcopy(model)
        paths = _lora_paths(student, cfg)
        lcfg = peft.LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=0.0,
            target_modules=list(paths),
            fan_in_fan_out=all(is_transposed(student.get_submodule(p)) for p in paths),
            bias="none",
        )
        import warnings

        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            torch.manual_seed(cfg.seed)
            trained = peft.get_peft_model(student, lcfg)
        params = {n: p for n, p in trained.named_parameters() if p.requires_grad}
        layers = {n: next(i for p, i in paths.items() if f".{p}." in f".{n}") for n in params}
        log["lora_parameters"] = sum(p.numel() for p in params.values())

        si = SIAccumulator(params.items(), xi=cfg.xi) if cfg.regularize == "si" else None
        log["phase1"] = _train(
            trained,
            params,
            _batches(rows1, cfg, cfg.phase1_epochs, cfg.seed),
            pad,
            cfg.phase1_lr,
            "phase 1",
            progress,
            si=si,
        )
        importance: Importance | None = None
        if si is not None:
            importance = si.finish()
        views: dict[str, LoraView] = {}
        if cfg.regularize in ("ewc", "ewc-ab"):
            rng = random.Random(cfg.seed + 1)
            pick = rng.sample(rows1, min(cfg.fisher_samples, len(rows1)))
            from kedit.core.batching import device_of

            dev = device_of(trained)
            samples = [_batch([r], pad, dev) for r in pick]
            fisher_progress = (lambda d, t: progress("fisher", d, t)) if progress else None
            if cfg.regularize == "ewc-ab":
                importance = fisher_diagonal(
                    trained, list(params.items()), samples, _lm_loss, progress=fisher_progress
                )
            else:
                base = {}
                for p in paths:
                    layer = student.get_submodule(p)
                    a = next(n for n in params if n.endswith(f".{p}.lora_A.default.weight"))
                    b = next(n for n in params if n.endswith(f".{p}.lora_B.default.weight"))
                    base[p] = layer.get_base_layer().weight
                    views[p] = LoraView(
                        a, b, float(layer.scaling["default"]), is_transposed(layer.get_base_layer())
                    )
                importance = fisher_full_space(
                    trained, base, views, params, samples, _lm_loss, progress=fisher_progress
                )
        penalty = None
        if importance is not None:
            log["importance"] = {
                "kind": importance.kind,
                "seconds": round(importance.seconds, 4),
                "state_bytes": importance.nbytes(),
                "weight_bytes": importance.weight_bytes(),
                "mean": float(torch.cat([w.flatten() for w in importance.weights.values()]).mean()),
                "zero_fraction": float(
                    torch.cat([(w == 0).flatten() for w in importance.weights.values()]).float().mean()
                ),
            }
            if views:
                penalty = ImportancePenalty(
                    importance,
                    {p: paths[p] for p in views},
                    cfg.layer_coeff,
                    cfg.weight,
                    view=lambda ps: lora_deltas(views, ps),
                )
            else:
                penalty = ImportancePenalty(importance, layers, cfg.layer_coeff, cfg.weight)
        log["phase2"] = _train(
            trained,
            params,
            _batches(rows2, cfg, cfg.phase2_epochs, cfg.seed + 2),
            pad,
            cfg.phase2_lr,
            "phase 2",
            progress,
            penalty=penalty,
        )
        if penalty is not None and penalty.last_alpha:
            log["layer_coefficients"] = {str(k): round(v, 4) for k, v in sorted(penalty.last_alpha.items())}
        updates = []
        for p, (left, right) in lora_factors(student, list(paths), "default").items():
            dev = model.get_submodule(p).weight.device
            updates.append(LowRankUpdate.from_math(model, f"{p}.weight", left.to(dev), right.to(dev)))
    if model_fingerprint(model) != base_fp:  # pragma: no cover - a bug, not a user error
        raise RuntimeError("fine-tuning changed the original model")
    log["seconds"] = round(time.perf_counter() - t_all, 3)
    delta = EditDelta.for_model(
        model,
        updates,
        method=f"finetune/{cfg.regularize}",
        config=cfg.to_dict(),
        meta={"finetune": {k: v for k, v in log.items() if k != "config"}},
    )
    return FinetuneResult(delta, log, importance)


def measure_recall(model: Any, tok: Any, probes: Sequence[tuple[str, str]]) -> float:
    """Share of ``(prompt, object)`` probes whose greedy continuation is `` object.`` (the testbed's recall)."""
    from kedit.testbed.gates import recall

    return float(recall(model, tok, list(probes)))
