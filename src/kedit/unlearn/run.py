"""One unlearning run: train a copy of the model with a registered method and return the change as a kedit
:class:`~kedit.deltas.EditDelta` (dense for full-weight training, low-rank for LoRA), so it can be saved,
inspected, applied and reverted bitwise like an edit. The model passed in is left bit-identical: training happens
on a deep copy, the original serves (frozen) as the reference model where a method needs one, and an interrupted
run leaves nothing applied.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .methods.base import ForgetRetainData, UnlearnConfig, collate
from .methods.registry import get_unlearn_method
from .splits import UnlearnSplit

__all__ = ["Probe", "UnlearnResult", "make_config", "run_trainer", "saturation_levels", "unlearn", "wrap_lora"]

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
#: ``probe(model, where) -> metrics``: called on the model being trained (in eval mode, under ``torch.no_grad``)
#: with ``where = {"epoch": float, "step": int}``; what it returns is recorded in ``log["train"]["trajectory"]``
Probe = Callable[[Any, dict[str, Any]], dict[str, Any]]


@dataclass
class UnlearnResult:
    delta: Any  # kedit.deltas.EditDelta
    log: dict[str, Any] = field(default_factory=dict)


def make_config(method: str, overrides: dict[str, Any] | None = None) -> UnlearnConfig:
    """The method's config: :class:`UnlearnConfig` defaults, then the method's, then ``overrides``."""
    spec = get_unlearn_method(method)
    return UnlearnConfig().replace(**dict(spec.defaults)).replace(**dict(overrides or {}))


def _progress_callback(stage: str, progress: Progress | None, losses: list[float]):
    from transformers import TrainerCallback

    class _CB(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

        def on_step_end(self, args, state, control, **kw):
            if progress is not None:
                progress(stage, state.global_step, state.max_steps)

    return _CB()


def _run_probe(model: Any, probe: Probe, where: dict[str, Any]) -> dict[str, Any]:
    """``probe`` on ``model`` without changing training: eval mode (no dropout draws) under ``no_grad``, the
    global RNG states forked (so nothing the probe draws moves the training's stream), train mode restored."""
    was_training = model.training
    model.eval()
    t0 = time.time()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            rec = dict(probe(model, dict(where)))
    finally:
        model.train(was_training)
    return {**where, **rec, "probe_seconds": round(time.time() - t0, 3)}


def _trajectory_callback(probe: Probe, every_steps: int, out: list[dict[str, Any]]):
    """Record ``probe`` at the end of every epoch and, with ``every_steps > 0``, every ``every_steps`` steps."""
    from transformers import TrainerCallback

    class _Traj(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if every_steps > 0 and state.global_step % every_steps == 0:
                out.append(_run_probe(model, probe, {"epoch": round(float(state.epoch), 4),
                                                     "step": int(state.global_step), "at": "step"}))

        def on_epoch_end(self, args, state, control, model=None, **kw):
            if out and out[-1]["step"] == state.global_step:  # already recorded at this step
                out[-1]["at"] = "epoch"
                return
            out.append(_run_probe(model, probe, {"epoch": round(float(state.epoch), 4),
                                                 "step": int(state.global_step), "at": "epoch"}))

    return _Traj()


def run_trainer(
    trainer_cls: type,
    student: Any,
    tok: Any,
    data: ForgetRetainData,
    cfg: UnlearnConfig,
    *,
    epochs: float,
    lr: float,
    stage: str,
    progress: Progress | None = None,
    probe: Probe | None = None,
    probe_every_steps: int = 0,
    **trainer_kw: Any,
) -> dict[str, Any]:
    """Train ``student`` in place with ``trainer_cls`` (a :class:`UnlearnTrainer`); returns a small log (with
    ``trajectory``: the ``probe`` records, when a probe is given)."""
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from kedit.core.batching import device_of, pad_id

    losses: list[float] = []
    trajectory: list[dict[str, Any]] = []
    callbacks = [_progress_callback(stage, progress, losses)]
    if probe is not None:
        callbacks.append(_trajectory_callback(probe, probe_every_steps, trajectory))
    with tempfile.TemporaryDirectory(prefix="kedit-unlearn-") as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=cfg.batch_size,
            num_train_epochs=epochs,
            max_steps=cfg.max_steps,
            learning_rate=lr,
            weight_decay=cfg.weight_decay,
            warmup_steps=0,
            lr_scheduler_type="linear",
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            seed=cfg.seed,
            data_seed=cfg.seed,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            use_cpu=device_of(student).type == "cpu",
        )
        trainer = trainer_cls(
            model=student,
            args=args,
            train_dataset=data,
            data_collator=collate(pad_id(tok)),
            unlearn_config=cfg,
            callbacks=callbacks,
            **trainer_kw,
        )
        for cb in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(cb)
        t0 = time.time()
        out = trainer.train()
    student.eval()
    log = {"steps": int(out.global_step), "seconds": round(time.time() - t0, 2), "loss": losses}
    if probe is not None:
        log["trajectory"] = trajectory
        log["probe_seconds"] = round(sum(r.get("probe_seconds", 0.0) for r in trajectory), 2)
    return log


def _quantile(v: list[float], q: float) -> float:
    """Linear-interpolation quantile of ``v`` (numpy's default method)."""
    import numpy as np

    return float(np.quantile(np.asarray(v, dtype=np.float64), q))


def saturation_levels(model: Any, tok: Any, split: UnlearnSplit, cfg: UnlearnConfig) -> list[float] | None:
    """Per forget item, the mean answer-token NLL at which its forget term stops (``cfg.saturation``; ``None``
    when ``"none"``), measured on ``model`` -- the *original*, before unlearning -- on ``split.holdout``: facts of
    never-trained persons, i.e. what the model's loss is on comparable text it never saw. No retain model is used.

    * ``"holdout"``: the ``cfg.saturation_quantile`` quantile of the holdout NLLs of the item's relation (all
      holdout items when the relation has none);
    * ``"holdout_pair"``: forget items and holdout items of each relation are matched by a seeded permutation
      (cycled when the holdout has fewer); the level is the matched item's NLL.
    """
    import random

    from .metrics import score_items

    if cfg.saturation == "none":
        return None
    if cfg.saturation not in ("holdout", "holdout_pair"):
        raise ValueError(f"unknown saturation {cfg.saturation!r} (none, holdout, holdout_pair)")
    if not 0.0 <= cfg.saturation_quantile <= 1.0:
        raise ValueError(f"saturation_quantile must be in [0, 1], got {cfg.saturation_quantile}")
    if not split.holdout:
        raise ValueError(f"saturation {cfg.saturation!r} needs the split's holdout items; {split.name} has none")
    was_training = model.training
    model.eval()
    try:
        nll = score_items(model, tok, split.holdout, generate=False).nll
    finally:
        model.train(was_training)
    by_rel: dict[str, list[float]] = {}
    for it, x in zip(split.holdout, nll):
        by_rel.setdefault(it.relation, []).append(float(x))
    if cfg.saturation == "holdout":
        pooled = _quantile([float(x) for x in nll], cfg.saturation_quantile)
        level = {r: _quantile(v, cfg.saturation_quantile) for r, v in by_rel.items()}
        return [level.get(it.relation, pooled) for it in split.forget]
    rng = random.Random(cfg.seed * 7919 + 13)
    pools: dict[str, list[float]] = {}
    for r, v in sorted(by_rel.items()):
        pools[r] = list(v)
        rng.shuffle(pools[r])
    allv = [float(x) for x in nll]
    rng.shuffle(allv)
    seen: dict[str, int] = {}
    out = []
    for it in split.forget:
        pool = pools.get(it.relation, allv)
        k = seen.get(it.relation, 0)
        seen[it.relation] = k + 1
        out.append(pool[k % len(pool)])
    return out


def _embedding_names(model: Any) -> set[str]:
    """Names of the parameters of the input/output embeddings and of learned position embeddings."""
    emb = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    out = set()
    for mod_name, mod in model.named_modules():
        if id(mod) in emb or isinstance(mod, torch.nn.Embedding):
            out.update(f"{mod_name}.{n}" if mod_name else n for n, _ in mod.named_parameters(recurse=False))
    return out


def _lora_targets(model: Any, cfg: UnlearnConfig) -> list[str]:
    from kedit.arch import get_adapter

    adapter = get_adapter(model)
    modules = dict(model.named_modules())
    if cfg.lora_targets:
        paths = [n for n in modules if any(n.endswith(t) for t in cfg.lora_targets)]
        missing = [t for t in cfg.lora_targets if not any(n.endswith(t) for n in modules)]
        if missing:
            raise ValueError(f"LoRA target module(s) {missing} do not exist in this model")
    else:
        slots = [s for s in ("mlp_in", "mlp_gate", "mlp_out") if getattr(adapter, s, None)]
        paths = [adapter.path(s, i) for i in range(adapter.num_layers(model)) for s in slots]
    return paths


def wrap_lora(model: Any, cfg: UnlearnConfig) -> tuple[Any, list[str]]:
    """``model`` with fresh peft LoRA adapters (rank, alpha and targets from ``cfg``; initialised with ``cfg.seed``)
    and the module paths they sit on. ``model`` itself is modified (pass a copy)."""
    import warnings

    import peft

    from kedit.arch import is_transposed

    paths = _lora_targets(model, cfg)
    lcfg = peft.LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        target_modules=paths,
        fan_in_fan_out=all(is_transposed(model.get_submodule(p)) for p in paths),
        bias="none",
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        torch.manual_seed(cfg.seed)
        return peft.get_peft_model(model, lcfg), paths


def unlearn(
    model: Any,
    tok: Any,
    split: UnlearnSplit,
    method: str = "npo",
    config: UnlearnConfig | dict[str, Any] | None = None,
    *,
    progress: Progress | None = None,
    probe: Probe | None = None,
    probe_every_steps: int = 0,
) -> UnlearnResult:
    """Unlearn ``split.forget`` from ``model`` with ``method`` and return the delta (the model is not changed).

    ``config``: an :class:`UnlearnConfig` or overrides of the method's defaults. ``progress(stage, step, total)``
    is called after every optimiser step (stages ``strengthen`` for RKLD's teacher, then ``unlearn``).

    ``probe`` (see :data:`Probe`, e.g. :func:`kedit.unlearn.evaluate.trajectory_probe`) is measured on the model
    being unlearned at the end of every epoch of the ``unlearn`` stage (and every ``probe_every_steps`` steps when
    > 0); the records are ``log["train"]["trajectory"]``. Probing does not change training: the delta is bitwise
    the one of the same run without a probe (tested). The delta's meta does not hold the trajectory.
    """
    from kedit.deltas import DenseUpdate, EditDelta, LowRankUpdate
    from kedit.fingerprint import model_fingerprint
    from kedit.methods.ft.objective import keep_grad_flags

    spec = get_unlearn_method(method)
    cfg = config if isinstance(config, UnlearnConfig) else make_config(spec.name, config)
    split.check()
    if cfg.lora and not spec.lora:
        raise ValueError(f"unlearning method {spec.name!r} has no LoRA variant")
    if cfg.saturation != "none" and not getattr(spec.trainer, "supports_saturation", False):
        raise ValueError(f"unlearning method {spec.name!r} has no per-item saturation (npo, simnpo have)")
    if cfg.retain_loss not in ("nll", "kl"):
        raise ValueError(f"unknown retain_loss {cfg.retain_loss!r} (nll, kl)")
    if cfg.retain_loss != "nll" and not getattr(spec.trainer, "uses_retain_term", False):
        raise ValueError(f"unlearning method {spec.name!r} has its own retain term; retain_loss applies to "
                         "grad_diff, npo, simnpo")
    base_fp = model_fingerprint(model)
    caps = saturation_levels(model, tok, split, cfg)
    data = ForgetRetainData(tok, split.forget, split.retain, seed=cfg.seed, max_length=cfg.max_length,
                            forget_caps=caps, retain_pairs=cfg.retain_pairs)
    log: dict[str, Any] = {"method": spec.name, "config": cfg.to_dict(), "split": split.name}
    if caps is not None:
        log["saturation_levels"] = {"min": min(caps), "median": _quantile(caps, 0.5), "max": max(caps)}
    t0 = time.time()
    extra_kw: dict[str, Any] = {}
    with keep_grad_flags(model, freeze=True):
        if getattr(spec.trainer, "needs_strengthened", False):
            from .methods.rkld import StrengthenTrainer

            strong = copy.deepcopy(model)
            for p in strong.parameters():
                p.requires_grad_(True)
            log["strengthen"] = run_trainer(
                StrengthenTrainer, strong, tok, data, cfg, epochs=cfg.strengthen_epochs, lr=cfg.strengthen_lr,
                stage="strengthen", progress=progress,
            )
            extra_kw["strengthened"] = strong
        student = copy.deepcopy(model)
        trainable = getattr(spec.trainer, "trainable_parameters", lambda m, c: None)(student, cfg)
        names = dict(student.named_parameters())
        if trainable is None and cfg.freeze_embeddings and not cfg.lora:
            trainable = [n for n in names if n not in _embedding_names(student)]
        if trainable is not None:
            unknown = [n for n in trainable if n not in names]
            if unknown:
                raise ValueError(f"{spec.name}: parameters {unknown} do not exist in this model")
        lora_paths: list[str] = []
        if cfg.lora:
            trained, lora_paths = wrap_lora(student, cfg)
        else:
            for n, p in names.items():
                p.requires_grad_(trainable is None or n in trainable)
            trained = student
        prepare = getattr(spec.trainer, "prepare", None)
        if prepare is not None:  # e.g. MemFlex: localise, then freeze what is not located
            log["prepare"] = prepare(trained, tok, data, cfg)
        ref = model if spec.trainer.needs_reference or cfg.retain_loss == "kl" else None
        log["train"] = run_trainer(
            spec.trainer, trained, tok, data, cfg, epochs=cfg.epochs, lr=cfg.lr, stage="unlearn",
            progress=progress, ref_model=ref, probe=probe, probe_every_steps=probe_every_steps, **extra_kw,
        )
        updates = []
        if cfg.lora:
            from kedit.methods.lora import lora_factors

            for p, (left, right) in lora_factors(student, lora_paths, "default").items():
                if not bool(left.any()) or not bool(right.any()):
                    continue  # an adapter that did not train (B still 0): no change of this weight
                dev = model.get_submodule(p).weight.device
                updates.append(LowRankUpdate.from_math(model, f"{p}.weight", left.to(dev), right.to(dev)))
        else:
            orig = dict(model.named_parameters())
            with torch.no_grad():
                for n, p in student.named_parameters():
                    if trainable is not None and n not in trainable:
                        continue
                    d = p.detach().to(orig[n].device, torch.float32) - orig[n].detach().float()
                    if bool(d.any()):
                        updates.append(DenseUpdate(n, d.to(orig[n].dtype) if orig[n].dtype == torch.float64 else d))
        if not updates:
            raise RuntimeError(f"{spec.name} changed no parameter (lr {cfg.lr}, {log['train']['steps']} steps)")
    if model_fingerprint(model) != base_fp:  # pragma: no cover - a bug, not a user error
        raise RuntimeError("unlearning changed the original model")
    log["seconds"] = round(time.time() - t0, 2)
    delta = EditDelta.for_model(
        model,
        updates,
        method=f"unlearn/{spec.name}",
        config=cfg.to_dict(),
        meta={
            "unlearn": {
                "split": split.name,
                "forget_items": len(split.forget),
                "retain_items": len(split.retain),
                "forget_subjects": list(split.forget_subjects),
                "lora": cfg.lora,
                "train": {k: v for k, v in log["train"].items() if k not in ("trajectory", "probe_seconds")},
                "strengthen": log.get("strengthen"),
                "located": (log.get("prepare") or {}).get("located"),
            }
        },
    )
    return UnlearnResult(delta, log)
