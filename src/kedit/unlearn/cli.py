"""``kedit unlearn`` and ``kedit unlearn-retain`` (registered on the main Typer app by :func:`register`)."""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import typer

__all__ = ["register", "run_unlearn"]

_SUMMARY_KEYS = (
    "unlearn_token_accuracy",
    "retention_token_accuracy",
    "retention_accuracy_kept",
    "unlearn_perplexity",
    "retention_perplexity",
    "forget_quality",
    "model_utility",
    "retain_model_utility",
    "forget_Q_A_Prob",
    "forget_Truth_Ratio",
    "forget_recall",
    "untouched_recall",
    "mia_loss_auc",
    "mia_min_k_plus_plus_auc",
)


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _check_tokenizers(tok: Any, other: Any, what: str) -> None:
    from kedit.cli_common import fail

    if tok.get_vocab() != other.get_vocab():
        fail(f"{what} has a different tokenizer than the model ({len(other)} vs {len(tok)} tokens, or other ids); "
             "forget quality compares token probabilities, so both must share one")


def _reference_model(model: str, spec: str, retain_model: Optional[Path], tok: Any) -> tuple[Any, str] | None:
    """The retain model to compare with: ``--retain-model``, else the testbed's for a testbed split and model."""
    from kedit.api import TESTBED_MODELS
    from kedit.cli_common import fail, load_or_fail

    if retain_model is not None:
        ref, rtok = load_or_fail(str(retain_model))
        _check_tokenizers(tok, rtok, f"retain model {retain_model}")
        return ref, str(retain_model)
    from kedit.unlearn.splits import FORGET_SPLITS

    if spec.startswith("testbed:") and spec.split(":", 1)[1] in FORGET_SPLITS and model in TESTBED_MODELS:
        from kedit.unlearn.retain_model import load_retain_model

        try:
            ref, rtok = load_retain_model(spec.split(":", 1)[1], TESTBED_MODELS[model])
        except FileNotFoundError as e:
            fail(str(e))
            raise
        _check_tokenizers(tok, rtok, "the testbed retain model")
        return ref, f"testbed retain model {spec.split(':', 1)[1]}/{TESTBED_MODELS[model]}"
    return None


def run_unlearn(
    model: str,
    method: str,
    forget: str,
    out_dir: Path,
    *,
    retain: Optional[Path] = None,
    retain_model: Optional[Path] = None,
    sets: Sequence[str] = (),
    lora: bool = False,
    no_eval: bool = False,
    eval_size: Optional[int] = None,
    json_out: bool = False,
    resume: bool = False,
    trajectory: bool = False,
    trajectory_steps: int = 0,
) -> None:
    """The body of ``kedit unlearn`` (also ``kedit eval --protocol unlearn/v1``). With ``resume``, an ``out_dir``
    that already holds a finished run of the same model, method, forget set and settings is reported again instead
    of refused (the protocol's runs are one step, so a finished run is the only resumable state).

    ``trajectory``: record the cheap metrics (:func:`kedit.unlearn.evaluate.trajectory_probe`: forget quality on
    the whole forget set and on its two person halves A / B, forget truth ratio mean / median, forget probability;
    scope accuracies on a scope split) at the end of every epoch (and every ``trajectory_steps`` steps when > 0)
    into ``train.train.trajectory`` of the record. Training, and so the delta, is the same with or without it."""
    from kedit.cli_common import (
        check_model_available,
        err,
        fail,
        load_or_fail,
        parse_sets,
        progress_bars,
    )
    from kedit.unlearn.evaluate import (
        PROTOCOL_ID,
        evaluate_model,
        reference_from,
        scope_summary,
        trajectory_probe,
    )
    from kedit.unlearn.loaders import load_forget_spec
    from kedit.unlearn.methods.registry import get_unlearn_method
    from kedit.unlearn.run import make_config, unlearn

    if resume and (out_dir / "unlearn.json").is_file():
        done = json.loads((out_dir / "unlearn.json").read_text(encoding="utf-8"))
        try:
            name = get_unlearn_method(method).name
            want_cfg = make_config(name, parse_sets(sets) | ({"lora": True} if lora else {})).to_dict()
        except ValueError as e:
            fail(str(e))
            raise
        want = {"model": model, "method": name, "forget": forget}
        if {k: done.get(k) for k in want} == want and done.get("config") == json.loads(json.dumps(want_cfg)):
            _print_record(done, json_out)
            return
        fail(f"--out {out_dir} holds another unlearn/v1 run ({done.get('method')} on {done.get('forget')}, "
             f"{done.get('model')}, other settings); give a new --out")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        fail(f"--out {out_dir} exists and is not an empty directory")
    try:
        spec = get_unlearn_method(method)
        overrides = parse_sets(sets)
        if lora:
            overrides["lora"] = True
        cfg = make_config(spec.name, overrides)
        split = load_forget_spec(forget, retain=str(retain) if retain else None)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
        raise
    m, tok = load_or_fail(model, **check_model_available(model))
    reference = None if no_eval else _reference_model(model, forget, retain_model, tok)
    if reference is None and not no_eval and not split.scopes:
        err.print("no retain model: forget quality is not measured (give --retain-model)", style="yellow")
    ref_scores = None
    if reference is not None and (trajectory or not no_eval):
        with err.status("measuring the retain model"):
            ref_scores = reference_from(reference[0], tok, split, max_items=eval_size)
    probe = None
    if trajectory or trajectory_steps > 0:
        probe = trajectory_probe(tok, split, ref_scores, groups=_halves(split, eval_size), max_items=eval_size)
    try:
        with progress_bars(not json_out) as bar:
            result = unlearn(m, tok, split, spec.name, cfg,
                             progress=(lambda s, d, t: bar(s, d, t)) if bar else None,
                             probe=probe, probe_every_steps=max(0, trajectory_steps))
    except (ValueError, RuntimeError) as e:
        fail(f"{spec.name}: {e}")
        raise
    metrics: dict[str, Any] = {}
    if not no_eval:
        with err.status("measuring unlearn/v1"):
            before = scope_summary(m, tok, split)  # KnowUnDo scopes: the pre-unlearning values
            with result.delta.applied(m):
                metrics = evaluate_model(m, tok, split, ref_scores, max_items=eval_size)
        metrics.update({f"{k}_before": v for k, v in before.items()})
        if before.get("retention_token_accuracy"):
            metrics["retention_accuracy_kept"] = (
                metrics["retention_token_accuracy"] / before["retention_token_accuracy"]
            )
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    result.delta.save(tmp / "delta")
    record = {
        "protocol": PROTOCOL_ID,
        "model": model,
        "method": spec.name,
        "forget": forget,
        "split": split.info,
        "reference": reference[1] if reference else None,
        "config": cfg.to_dict(),
        "train": result.log,
        "eval_size": eval_size,
        "metrics": _finite(metrics),
        "delta": str(out_dir / "delta"),
    }
    (tmp / "unlearn.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    if out_dir.exists():
        out_dir.rmdir()
    tmp.rename(out_dir)
    _print_record(record, json_out)


def _halves(split: Any, max_items: Optional[int]) -> dict[str, list[int]] | None:
    """The person halves A / B (:func:`kedit.unlearn.splits.forget_halves`) as indices into the forget items that
    are measured (the ``max_items`` sample when capped); ``None`` for fewer than two forget persons."""
    from kedit.unlearn.evaluate import _cap
    from kedit.unlearn.splits import forget_halves

    try:
        halves = forget_halves(split)
    except ValueError:
        return None
    items = _cap(split.forget, max_items, 1)
    out = {}
    for g, idx in halves.items():
        who = {split.forget[i].subject for i in idx}
        out[g] = [i for i, q in enumerate(items) if q.subject in who]
    return out if all(out.values()) else None


def _print_record(record: dict[str, Any], json_out: bool) -> None:
    from kedit.cli_common import out

    if json_out:
        sys.stdout.write(json.dumps(record) + "\n")
        return
    log = record["train"]
    split = record.get("split") or {}
    out.print(f"{record['method']} on {record['forget']}: {split.get('forget_facts', '?')} forget / "
              f"{split.get('retain_facts', '?')} retain facts, "
              f"{log['train']['steps']} steps in {log['seconds']:.0f}s; delta in {record['delta']}")
    for k in _SUMMARY_KEYS:
        if k in record["metrics"]:
            out.print(f"  {k:28s} {record['metrics'][k]:.4g}")


def register(app: typer.Typer) -> None:
    @app.command("unlearn")
    def unlearn_cmd(
        model: str = typer.Option(..., "--model", help="Model name or directory (testbed-gpt2, testbed-llama, ...)."),
        method: str = typer.Option("npo", "--method", help="grad_ascent, grad_diff, npo, simnpo, rmu, rkld or memflex."),
        forget: str = typer.Option(..., "--forget", help="testbed:forget01|forget05|forget10, testbed:privacy01|"
                                   "privacy05|privacy10|privacy10minus05 (KnowUnDo scopes), or a TOFU / KnowUnDo forget file."),
        retain: Optional[Path] = typer.Option(None, "--retain", help="Retain file for a TOFU / KnowUnDo forget file."),
        out_dir: Path = typer.Option(..., "--out", help="Directory for the delta and unlearn.json (new or empty)."),
        retain_model: Optional[Path] = typer.Option(
            None, "--retain-model", help="Retain model for forget quality (default: the testbed's, for testbed "
            "splits)."),
        sets: list[str] = typer.Option([], "--set", help="Config override key=value (JSON values), repeatable."),
        lora: bool = typer.Option(False, "--lora", help="Train LoRA adapters (low-rank delta) instead of weights."),
        no_eval: bool = typer.Option(False, "--no-eval", help="Only unlearn and save the delta."),
        eval_size: Optional[int] = typer.Option(None, "--eval-size", help="Cap every measured set at N items (a "
                                                "seeded sample; quick checks, not the protocol's figures)."),
        json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
        trajectory: bool = typer.Option(False, "--trajectory", help="Record forget quality (whole forget set and "
                                        "its person halves A / B), forget truth ratio and probability (scope "
                                        "accuracies on a scope split) at the end of every epoch into the record."),
        trajectory_steps: int = typer.Option(0, "--trajectory-steps", help="Also record them every N steps."),
    ) -> None:
        """Unlearn a forget set, save the change as a kedit delta (revertible bitwise) and measure unlearn/v1:
        forget quality against the retain model, model utility (and the retain model's), MIA AUCs, recall of every
        untouched fact."""
        run_unlearn(model, method, forget, out_dir, retain=retain, retain_model=retain_model, sets=sets, lora=lora,
                    no_eval=no_eval, eval_size=eval_size, json_out=json_out, trajectory=trajectory,
                    trajectory_steps=trajectory_steps)

    @app.command("unlearn-retain")
    def unlearn_retain_cmd(
        split: str = typer.Option("forget10", "--split", help="forget01, forget05 or forget10."),
        arch: str = typer.Option("gpt2", "--arch", help="gpt2 or llama."),
        out_dir: Optional[Path] = typer.Option(None, "--out", help="Where to write it (default: the kedit cache)."),
        epochs: Optional[int] = typer.Option(None, "--epochs", help="Override the recipe's 20 epochs (experiments)."),
        json_out: bool = typer.Option(False, "--json"),
    ) -> None:
        """Train the retain model of a testbed split: the testbed recipe without the forget persons (about 20
        minutes per model on one CPU core)."""
        from kedit.cli_common import fail, out, progress_bars
        from kedit.unlearn.retain_model import build_retain_model

        try:
            with progress_bars(not json_out) as bar:
                path = build_retain_model(split, arch, out_dir, epochs=epochs,
                                          progress=(lambda d, t: bar("training", d, t)) if bar else None)
        except ValueError as e:
            fail(str(e))
            raise
        record = json.loads((path / "retain.json").read_text(encoding="utf-8"))
        record["path"] = str(path)
        if json_out:
            sys.stdout.write(json.dumps(record) + "\n")
        else:
            out.print(f"retain model {split}/{arch} written to {path} ({record['train_seconds']:.0f}s)")
