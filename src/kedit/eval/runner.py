"""The evaluation runner: protocol × metrics over a list of requests, batched, cached, resumable.

    from kedit.eval import EvalConfig, run_eval
    run = run_eval(model, tok, requests, "rome", config=EvalConfig(protocol="batch/v1", batch_size=10),
                   out_dir="runs/rome-batch")
    run.summary["metrics"]["reliability"]      # {"mean": ..., "ci95": [lo, hi], "definition": ..., ...}

Files in ``out_dir``:

* ``manifest.json`` -- what this run is: protocol id and description, method and its full config, model name and
  fingerprint, a hash of the records, the evaluation config, every metric definition, kedit version. A rerun with
  the same identity **resumes**; a different identity in the same directory is refused.
* ``records.jsonl`` -- one line per evaluated record, appended (and flushed) as soon as its step is evaluated:
  index, case_id, step, n_edits (edits applied when it was evaluated), every metric after and before the edit,
  and (``keep_observations``) the raw measurements.
* ``summary.json`` -- the aggregate (means with bootstrap CIs, definitions, timing) once the run is complete.

Pre-edit measurements depend only on (model, records, measurement config): they are computed once, in batches,
and cached in ``pre_cache_dir`` (default ``out_dir``) under a content key, so runs of several methods on the same
model and data can share them.

Records that do not fit the model's context window (their longest prompt plus what is appended to it: the target,
the greedy continuation, the fluency generation, a method's context-template prefix) are found before any work,
written as error records with ``"skipped": true`` and the reason, counted in the summary's ``n_skipped``, and
neither edited nor measured; the rest of the run goes on (KnowEdit WikiBio prompts are longer than the testbed
models' 128 positions). Errors name records by ``case_id`` and 1-based position (:func:`kedit.api.record_label`).

Resuming: records already in ``records.jsonl`` are not evaluated again. For ``single``/``batch`` the steps whose
records are all done are skipped outright; for the sequential protocols the earlier edits are *replayed* (recomputed
with the same seed, which is deterministic) up to the last step with records still to evaluate -- replaying rather
than loading saved deltas also restores any cross-call method state kept in ``EditContext.state``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from kedit.core.context import EditContext
from kedit.data.select import mentions_any, subject_conflicts, subject_key
from kedit.eval.metrics import HEADLINES, Observation, metric_definitions, perplexity, record_metrics
from kedit.eval.protocols import Protocol, Step, check_checkpoints, get_protocol
from kedit.eval.scoring import (
    ScoringConfig,
    fluency_prompts,
    observe,
    probe_specs,
    record_new_tokens,
    text_nll,
)
from kedit.fingerprint import model_fingerprint
from kedit.requests import EditRequest, as_requests

__all__ = [
    "EVAL_FORMAT_VERSION",
    "EvalConfig",
    "EvalRun",
    "RunMismatchError",
    "bootstrap_ci",
    "load_run",
    "run_eval",
    "summarize",
]

log = logging.getLogger(__name__)

#: version of the on-disk result format (manifest/records/summary)
EVAL_FORMAT_VERSION = 1
#: how neighbourhood probes are chosen for locality (2: probes naming a subject edited in the evaluated model state
#: are excluded and counted in each record's ``locality_excluded``; 1, before: every probe counted)
LOCALITY_RULE = 2

Progress = Callable[[str, int, int], None]


class RunMismatchError(ValueError):
    """``out_dir`` holds results of a different run (other protocol, method, config, model or records)."""


@dataclass(frozen=True)
class EvalConfig:
    """How a run evaluates (numbers and flags only).

    Attributes:
        protocol: ``single/v1``, ``batch/v1``, ``sequential-final/v1`` or ``sequential-immediate/v1``.
        batch_size: k, the number of requests per edit (one ``compute`` call); ignored by ``single``.
        eval_batch_size: prompts per forward pass when measuring (1 = one prompt at a time).
        max_new_tokens: greedy continuation length for exact match and generation locality.
        fluency_tokens: generation length for n-gram entropy (0 disables fluency).
        fluency_prompts: generation prompts per record for fluency.
        headline: which definition each summary aspect shows: ``exact_match`` (strict, default), ``token_acc``
            (EasyEdit-compatible teacher-forced partial credit) or ``counterfact`` (ES/PS/NS).
        seed: seed of the editing context (sampled templates) and of the bootstrap.
        bootstrap: bootstrap resamples for the 95 % confidence intervals.
        eval_chunk: records evaluated (and written) together when a step evaluates many (sequential-final).
        keep_observations: store the raw measurements (generations, token scores) in ``records.jsonl``.
        on_error: ``raise`` (default) or ``record``: a record whose edit or measurement fails is written as an
            error record (its metrics are missing and the summary counts it in ``n_errors``) and the run goes on.
            Records too long for the context window are skipped either way (``n_skipped``).
        checkpoints: ``lifelong`` only: numbers of edits after which to evaluate (positive, increasing; the last
            is the stream length T; ``None``: 10, 100, 300, 1000 cut to the records given).
        reedit_rate: ``lifelong`` only: share of the stream that re-edits an earlier fact to a new target, [0, 0.5).
        locality_probes: ``lifelong`` only: size of the fixed probe set of untouched facts (0: none).
    """

    protocol: str = "single/v1"
    batch_size: int = 1
    eval_batch_size: int = 64
    max_new_tokens: int = 8
    fluency_tokens: int = 32
    fluency_prompts: int = 1
    headline: str = "exact_match"
    seed: int = 0
    bootstrap: int = 2000
    eval_chunk: int = 64
    keep_observations: bool = True
    on_error: str = "raise"
    checkpoints: tuple[int, ...] | None = None
    reedit_rate: float = 0.1
    locality_probes: int = 200

    def __post_init__(self) -> None:
        get_protocol(self.protocol)
        if self.checkpoints is not None:
            object.__setattr__(self, "checkpoints", check_checkpoints(self.checkpoints))
        if not 0.0 <= self.reedit_rate < 0.5:
            raise ValueError(f"reedit_rate must be in [0, 0.5), got {self.reedit_rate}")
        if self.locality_probes < 0:
            raise ValueError("locality_probes must be ≥ 0")
        if self.headline not in HEADLINES:
            raise ValueError(f"unknown headline {self.headline!r}; known: {sorted(HEADLINES)}")
        if self.on_error not in ("raise", "record"):
            raise ValueError("on_error must be 'raise' or 'record'")
        if self.batch_size < 1 or self.eval_batch_size < 1 or self.eval_chunk < 1:
            raise ValueError("batch sizes must be ≥ 1")

    def scoring(self) -> ScoringConfig:
        return ScoringConfig(self.eval_batch_size, self.max_new_tokens, self.fluency_tokens, self.fluency_prompts)


@dataclass
class EvalRun:
    """The outcome of :func:`run_eval` (also rebuilt from a directory by :func:`load_run`)."""

    manifest: dict[str, Any]
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    out_dir: Path | None = None
    points: list[dict[str, Any]] = field(default_factory=list)


# -- helpers ---------------------------------------------------------------------------------------------------------
#: bumped when how a record is measured changes (2: continuation length extended per record to its longest answer;
#: 3: fluency generations have their full length, end-of-text suppressed)
SCORING_RULE = 3


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Lines of a JSONL file; a truncated last line (a run killed while writing) is ignored."""
    if not path.is_file():
        return []
    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("ignoring a truncated line in %s", path)
    return out


def _append_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    if not rows:
        return
    data = "".join(json.dumps(_jsonable(r)) + "\n" for r in rows)
    with path.open("a", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def bootstrap_ci(values: Sequence[float], *, resamples: int = 2000, seed: int = 0) -> tuple[float, float] | None:
    """95 % percentile-bootstrap interval of the mean (resampling records with replacement; seeded)."""
    import numpy as np

    if not values:
        return None
    arr = np.asarray(values, dtype=np.float64)
    if len(arr) == 1 or resamples < 1:
        return float(arr.mean()), float(arr.mean())
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 4_000_000 // len(arr))
    for b in range(0, resamples, chunk):
        m = min(chunk, resamples - b)
        means[b : b + m] = arr[rng.integers(0, len(arr), size=(m, len(arr)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def _stat(values: list[float], seed: int, resamples: int) -> dict[str, Any]:
    mean = sum(values) / len(values) if values else None
    ci = bootstrap_ci(values, resamples=resamples, seed=seed)
    return {"mean": mean, "ci95": list(ci) if ci else None, "n": len(values)}


def summarize(
    records: Sequence[Mapping[str, Any]], manifest: Mapping[str, Any], *, seconds: float | None = None
) -> dict[str, Any]:
    """The summary object of a run: headline aspects and every registered metric, each with mean, 95 % CI, n,
    its definition and its pre-edit mean (where meaningful)."""
    cfg = manifest["eval_config"]
    seed, resamples = int(cfg.get("seed", 0)), int(cfg.get("bootstrap", 2000))
    defs = manifest["metric_definitions"]
    ok = [r for r in records if not r.get("error")]
    n_skipped = sum(1 for r in records if r.get("skipped"))
    detailed: dict[str, Any] = {}
    for name, d in defs.items():
        post = [r["metrics"][name] for r in ok if r["metrics"].get(name) is not None]
        entry = {**_stat(post, seed, resamples), "metric": name, "definition": d["definition"],
                 "partial_credit": d["partial_credit"]}
        if not d["needs_pre"]:
            pre = [r["pre_metrics"][name] for r in ok if r.get("pre_metrics", {}).get(name) is not None]
            entry["pre_mean"] = sum(pre) / len(pre) if pre else None
        detailed[name] = entry
    metrics: dict[str, Any] = {aspect: dict(detailed[name]) for aspect, name in HEADLINES[cfg["headline"]].items()}
    metrics.update(detailed)
    return {
        "format_version": EVAL_FORMAT_VERSION,
        "protocol": manifest["protocol"]["id"],
        "protocol_info": manifest["protocol"],
        "method": manifest["method"],
        "model": manifest["model"],
        "n": manifest["n"],
        "n_evaluated": len(records),
        "n_errors": len(records) - len(ok) - n_skipped,
        "n_skipped": n_skipped,
        "locality_probes_excluded": sum(int(r.get("locality_excluded", 0)) for r in ok),
        "errors": [{"index": r["index"], "record": int(r["index"]) + 1, "case_id": r.get("case_id"),
                    "skipped": bool(r.get("skipped")), "error": r["error"]} for r in records if r.get("error")][:50],
        "batch_size": cfg.get("batch_size"),
        "headline": cfg["headline"],
        "metrics": metrics,
        "seconds": None if seconds is None else round(seconds, 3),
        "kedit_version": manifest.get("kedit_version"),
    }


#: EvalConfig fields that only the lifelong protocol reads (left out of other runs' identity, so result directories
#: written before they existed still resume)
LIFELONG_FIELDS = ("checkpoints", "reedit_rate", "locality_probes")


def _open_run_dir(out: Path, identity: Mapping[str, Any]) -> tuple[bool, float]:
    """Create ``out`` or check that the run it holds is this one (``identity``: the manifest keys that define a
    run); returns ``(resuming, seconds already spent)``. Raises :class:`RunMismatchError` for another run's
    results. Shared by :func:`run_eval` and the lifelong runner (:mod:`kedit.eval.lifelong`)."""
    out.mkdir(parents=True, exist_ok=True)
    mpath = out / "manifest.json"
    if not mpath.is_file():
        return False, 0.0
    old = json.loads(mpath.read_text(encoding="utf-8"))
    old_id = {k: old.get(k) for k in identity}
    old_id["eval_config"] = _identity_config(old.get("eval_config") or {})
    if old_id != identity:
        diff = sorted(k for k in identity if old_id.get(k) != identity[k])
        raise RunMismatchError(
            f"{out} holds results of a different run (differs in: {', '.join(diff)}); "
            "use another output directory or delete it"
        )
    return True, float((old.get("state") or {}).get("seconds", 0.0))


def _identity_config(eval_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The part of an evaluation config that decides results (batch sizes of measurement do not)."""
    lifelong = str(eval_cfg.get("protocol", "")).startswith("lifelong")
    return {k: v for k, v in eval_cfg.items()
            if k not in ("eval_batch_size", "eval_chunk") and (lifelong or k not in LIFELONG_FIELDS)}


def _method_config(model: nn.Module, method: str, config: Any) -> tuple[Any, Any]:
    from kedit.methods.registry import get_method

    spec = get_method(method)
    if config is None or isinstance(config, Mapping):
        cfg = spec.make_config(config, base=spec.default_config(model))
    elif isinstance(config, spec.config):
        cfg = config
    else:
        raise TypeError(f"config for {spec.name} must be a {spec.config.__name__} or a dict")
    return spec, cfg


def too_long_records(
    model: nn.Module, tok, reqs: Sequence[EditRequest], config: EvalConfig, method_config: Any = None
) -> dict[int, str]:
    """``{index: reason}`` of the records that do not fit ``model``'s context window under ``config``: the edit
    prompt with its target (and ``method_config``'s context-template prefix), every probe prompt with its greedy
    continuation, and every fluency prompt with its generation."""
    from kedit.api import _n_tokens, _template_reserve, context_window, record_label, request_too_long

    window = context_window(model)
    if window is None:
        return {}
    reserve = _template_reserve(method_config)
    out: dict[int, str] = {}
    for i, r in enumerate(reqs):
        reason = request_too_long(model, tok, r, reserve=reserve)
        if reason is None:
            specs = probe_specs(r)
            new = record_new_tokens(tok, specs, config.max_new_tokens)
            need = [(_n_tokens(tok, s.prompt) + new, f"the {g} prompt") for g, ss in specs.items() for s in ss]
            if config.fluency_tokens > 0:
                need += [(_n_tokens(tok, p) + config.fluency_tokens, "a fluency prompt")
                         for p in fluency_prompts(r, config.fluency_prompts)]
            n, what = max(need, default=(0, ""))
            if n > window:
                reason = f"too long: {what} needs {n} tokens, more than the model's context window of {window}"
        if reason is not None:
            out[i] = reason
            log.warning("skipping %s: %s", record_label(i, r.case_id), reason)
    return out


# -- the runner --------------------------------------------------------------------------------------------------
def run_eval(
    model: nn.Module,
    tok,
    requests: Sequence[EditRequest | Mapping[str, Any]],
    method: str,
    *,
    method_config: Any = None,
    config: EvalConfig = EvalConfig(),
    out_dir: str | os.PathLike[str] | None = None,
    ctx: EditContext | None = None,
    ppl_texts: Sequence[str] | None = None,
    model_name: str | None = None,
    pre_cache_dir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    locality_facts: Sequence[Any] | None = None,
    reedit_targets: Mapping[str, Sequence[str]] | None = None,
) -> EvalRun:
    """Evaluate ``method`` on ``requests`` under ``config.protocol`` and return the run (also written to
    ``out_dir`` if given, resuming whatever is already there).

    Args:
        method_config: the method's config dataclass or a dict of overrides on its architecture preset.
        ctx: editing context (statistics cache, corpus, injected templates); its ``seed`` is replaced by
            ``config.seed``. Non-cumulative protocols give every step a fresh ``state``.
        ppl_texts: general texts for the capability/perplexity metric (``None``: the metric is not measured and
            the summary says so).
        model_name: how the model is named in results (default: its ``config._name_or_path``).
        pre_cache_dir: where pre-edit measurements are cached (default ``out_dir``; none without either).
        progress: ``fn(stage, done, total)``.
        locality_facts: ``lifelong`` only: candidate probes (:class:`~kedit.requests.Probe` with an answer) for the
            fixed locality set; default: the neighbourhood probes of ``requests`` (see :mod:`kedit.eval.lifelong`).
        reedit_targets: ``lifelong`` only: ``{relation: candidate objects}`` for re-edit targets; default: the
            targets and true objects of ``requests`` of the same relation.
    """
    from kedit import api
    from kedit.deltas import kedit_version

    reqs = as_requests(list(requests))
    if not reqs:
        raise ValueError("no records to evaluate")
    protocol: Protocol = get_protocol(config.protocol)
    spec, mcfg = _method_config(model, method, method_config)
    if protocol.name == "lifelong":
        from kedit.eval.lifelong import run_lifelong

        return run_lifelong(model, tok, reqs, spec, mcfg, config=config, out_dir=out_dir, ctx=ctx,
                            ppl_texts=ppl_texts, model_name=model_name, pre_cache_dir=pre_cache_dir,
                            progress=progress, locality_facts=locality_facts, reedit_targets=reedit_targets)
    scoring = config.scoring()
    name = model_name or str(getattr(getattr(model, "config", None), "_name_or_path", "") or "model")
    t_start = time.perf_counter()
    fingerprint = model_fingerprint(model)
    records_hash = _sha([r.to_dict() for r in reqs])
    ppl_hash = _sha(list(ppl_texts)) if ppl_texts else None
    eval_cfg = _jsonable(config)
    identity = {
        "format_version": EVAL_FORMAT_VERSION,
        "protocol": protocol.describe(),
        "method": spec.name,
        "method_config": _jsonable(mcfg),
        "model": name,
        "model_fingerprint": fingerprint,
        "records_hash": records_hash,
        "n": len(reqs),
        "eval_config": _identity_config(eval_cfg),
        "ppl_texts_hash": ppl_hash,
        "locality_rule": {"version": LOCALITY_RULE, "rule": "neighbourhood probes that name a subject edited in "
                          "the evaluated model state are excluded (counted per record in locality_excluded)"},
    }
    manifest = {
        **identity,
        "eval_config": eval_cfg,
        "metric_definitions": metric_definitions(),
        "kedit_version": kedit_version(),
        "perplexity": "measured" if ppl_texts else "not measured: no general texts given (ppl_texts)",
    }
    out = Path(out_dir) if out_dir is not None else None
    done: dict[int, dict[str, Any]] = {}
    prior_seconds = 0.0
    if out is not None:
        mpath = out / "manifest.json"
        resuming, prior_seconds = _open_run_dir(out, identity)
        if resuming:
            for row in _read_jsonl(out / "records.jsonl"):
                done[int(row["index"])] = row
            if done:
                log.info("resuming %s: %d of %d records already evaluated", out, len(done), len(reqs))
        manifest["state"] = {"seconds": prior_seconds, "complete": False}
        _write_json(mpath, manifest)

    def report(stage: str, d: int, t: int) -> None:
        if progress is not None:
            progress(stage, d, t)

    # -- records that cannot fit the context window: skipped, before any work ------------------------------------
    skipped = too_long_records(model, tok, reqs, config, mcfg)

    # -- pre-edit measurements: once, batched, cached --------------------------------------------------------------
    pre_obs, pre_ppl = _pre_edit(model, tok, reqs, scoring, ppl_texts, fingerprint, records_hash, ppl_hash,
                                 Path(pre_cache_dir) if pre_cache_dir is not None else out, report, skip=skipped)
    pre_metrics = [record_metrics(o, None) if o is not None else {} for o in pre_obs]

    # -- the protocol ------------------------------------------------------------------------------------------
    steps = protocol.plan(len(reqs), config.batch_size)
    # requests sharing a subject inside one compute call fight over one key (see kedit.data.select)
    conflicts = sum(subject_conflicts([reqs[i] for i in s.edit]) for s in steps)
    if conflicts:
        log.warning("%d request(s) share a subject with another request of the same edit batch; batched "
                    "locate-then-edit methods cannot satisfy both (use distinct_subjects / --distinct-subjects)",
                    conflicts)
    pending = [s for s in steps if any(i not in done for i in s.evaluate)]
    last_needed = max((s.index for s in pending), default=-1)
    base_ctx = ctx or EditContext()
    base_ctx = dataclasses.replace(base_ctx, seed=config.seed, state={})
    applied: list[Any] = []  # EditResult stack
    failed: dict[int, str] = dict(skipped)  # record index -> why it has no metrics (too long, or its edit failed)
    n_applied = 0
    n_done = len(done)
    report("evaluate", n_done, len(reqs))
    t_session = time.perf_counter()

    def restore() -> None:
        nonlocal n_applied
        while applied:
            applied.pop().revert(model)
        n_applied = 0

    try:
        for step in steps:
            if step.index > last_needed:
                break
            todo = [i for i in step.evaluate if i not in done]
            if not protocol.cumulative and not todo:
                continue
            step_ctx = base_ctx if protocol.cumulative else dataclasses.replace(base_ctx, state={})
            to_edit = [i for i in step.edit if i not in skipped]
            try:
                if to_edit:
                    res = api.edit(model, tok, [reqs[i] for i in to_edit], method=spec.name, config=mcfg,
                                   ctx=step_ctx, apply=True, evaluate=False)
                    applied.append(res)
                    n_applied += len(to_edit)
            except Exception as e:
                names = ", ".join(api.record_label(i, reqs[i].case_id) for i in to_edit[:5])
                if len(to_edit) > 5:
                    names += ", ..."
                if config.on_error == "raise":
                    if not hasattr(e, "kedit_records") or len(to_edit) > 1:
                        e.kedit_records = names  # type: ignore[attr-defined]
                    raise
                error = f"{type(e).__name__}: {e}"
                log.warning("step %d (%s) failed: %s", step.index, names, error)
                failed.update({i: error for i in to_edit})
            if todo:
                ppl = _ppl(model, tok, ppl_texts, scoring.batch_size)
                chunk = min(len(todo), config.eval_chunk)
                for b in range(0, len(todo), chunk):
                    idx = todo[b : b + chunk]
                    rows = _evaluate(model, tok, reqs, idx, step, n_applied, scoring, pre_obs, pre_metrics, ppl,
                                     config, failed, edited_subjects(applied), skipped=skipped)
                    if out is not None:
                        _append_jsonl(out / "records.jsonl", rows)
                    for row in rows:
                        done[row["index"]] = row
                    n_done += len(rows)
                    report("evaluate", n_done, len(reqs))
                    if out is not None:
                        manifest["state"] = {"seconds": prior_seconds + time.perf_counter() - t_session,
                                             "complete": False}
                        _write_json(out / "manifest.json", manifest)
            if step.restore:
                restore()
    finally:
        restore()
    if model_fingerprint(model) != fingerprint:
        raise RuntimeError("the model was not restored to its pre-run weights; results are not trustworthy")

    seconds = prior_seconds + time.perf_counter() - t_session
    records = [done[i] for i in sorted(done)]
    summary = summarize(records, manifest, seconds=seconds)
    summary["pre_perplexity"] = pre_ppl
    summary["setup_seconds"] = round(t_session - t_start, 3)
    summary["subject_conflicts"] = conflicts
    if out is not None:
        manifest["state"] = {"seconds": seconds, "complete": True}
        _write_json(out / "manifest.json", manifest)
        _write_json(out / "summary.json", summary)
    return EvalRun(manifest, records, summary, out)


def _ppl(model: nn.Module, tok, texts: Sequence[str] | None, batch_size: int) -> float | None:
    if not texts:
        return None
    total, count = text_nll(model, tok, texts, batch_size=batch_size)
    return perplexity(total, count) if count else None


def _evaluate(
    model: nn.Module,
    tok,
    reqs: Sequence[EditRequest],
    idx: Sequence[int],
    step: Step,
    n_applied: int,
    scoring: ScoringConfig,
    pre_obs: Sequence[Observation],
    pre_metrics: Sequence[dict[str, float | None]],
    ppl: float | None,
    config: EvalConfig,
    failed: Mapping[int, str],
    edited: frozenset[str] = frozenset(),
    skipped: Mapping[int, str] | None = None,
) -> list[dict[str, Any]]:
    skipped = skipped or {}
    failed = dict(failed)

    def measure(ids: list[int]) -> list[Observation]:
        return observe(model, tok, [reqs[i] for i in ids], scoring, pre=[pre_obs[i] for i in ids], perplexity=ppl)

    todo = [i for i in idx if i not in failed]
    obs: list[Observation] = []
    try:
        obs = measure(todo) if todo else []
    except Exception:
        if config.on_error == "raise":
            raise
        # find the record(s) the measurement fails on: one at a time
        obs, kept = [], []
        for i in todo:
            try:
                obs.extend(measure([i]))
                kept.append(i)
            except Exception as e:
                from kedit.api import record_label

                failed[i] = f"measurement failed: {type(e).__name__}: {e}"
                log.warning("%s: %s", record_label(i, reqs[i].case_id), failed[i])
        todo = kept
    rows = [{"index": i, "case_id": reqs[i].case_id, "step": step.index, "n_edits": n_applied, "error": failed[i],
             "skipped": i in skipped, "metrics": {}, "pre_metrics": pre_metrics[i]} for i in idx if i in failed]
    idx = todo
    base = [{"index": i, "case_id": reqs[i].case_id, "step": step.index, "n_edits": n_applied} for i in idx]
    for b, i, o in zip(base, idx, obs):
        post_m, pre_m, excluded = without_edited_neighbours(o, pre_obs[i], edited)
        row = {**b, "error": None, "metrics": record_metrics(post_m, pre_m), "pre_metrics": pre_metrics[i],
               "locality_excluded": excluded}
        if config.keep_observations:
            row["observation"] = o.to_dict()
        rows.append(row)
    return rows


def edited_subjects(applied: Sequence[Any]) -> frozenset[str]:
    """Subjects (:func:`~kedit.data.select.subject_key` form) of every edit applied in the current model state."""
    return frozenset(subject_key(r.subject) for res in applied for r in res.requests)


def without_edited_neighbours(
    post: Observation, pre: Observation, edited: frozenset[str]
) -> tuple[Observation, Observation, int]:
    """``post`` and ``pre`` without the neighbourhood probes that name a subject edited in the model state under
    evaluation (locality rule 2), and how many were dropped.

    A neighbourhood probe is meant to ask an *unrelated* fact. In a batch or a sequence of edits, a probe about
    another edited subject -- often the very relation being edited -- is expected to change, and counting it as
    a locality failure punishes the edit for succeeding. On the testbed (316 subjects) a batch of 200 distinct
    subjects makes most neighbourhood probes such probes, so this decides what locality means at scale.
    """
    probes = post.group("neighborhood")
    keep = [j for j, p in enumerate(probes) if not mentions_any(p.prompt, edited)]
    if len(keep) == len(probes):
        return post, pre, 0

    def pick(o: Observation) -> Observation:
        group = o.group("neighborhood")
        return dataclasses.replace(o, groups={**o.groups, "neighborhood": tuple(group[j] for j in keep)})

    return pick(post), pick(pre), len(probes) - len(keep)


def _pre_edit(
    model: nn.Module,
    tok,
    reqs: Sequence[EditRequest],
    scoring: ScoringConfig,
    ppl_texts: Sequence[str] | None,
    fingerprint: str,
    records_hash: str,
    ppl_hash: str | None,
    cache_dir: Path | None,
    report: Progress,
    skip: Mapping[int, str] | None = None,
) -> tuple[list[Observation | None], float | None]:
    """Pre-edit observations of every record (and the pre-edit perplexity), from the cache where present; ``None``
    for the records in ``skip``."""
    skip = skip or {}
    key = _sha({"model": fingerprint, "records": records_hash, "ppl": ppl_hash, "rule": SCORING_RULE,
                "scoring": {k: v for k, v in dataclasses.asdict(scoring).items() if k != "batch_size"}})[:20]
    cached: dict[int, Observation] = {}
    meta_path = obs_path = None
    pre_ppl: float | None = None
    have_ppl = False
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        obs_path = cache_dir / f"pre-{key}.jsonl"
        meta_path = cache_dir / f"pre-{key}.json"
        for row in _read_jsonl(obs_path):
            cached[int(row["index"])] = Observation.from_dict(row["observation"])
        if meta_path.is_file():
            pre_ppl = json.loads(meta_path.read_text(encoding="utf-8")).get("perplexity")
            have_ppl = True
    if not have_ppl:
        pre_ppl = _ppl(model, tok, ppl_texts, scoring.batch_size)
        if meta_path is not None:
            _write_json(meta_path, {"perplexity": pre_ppl, "model_fingerprint": fingerprint})
    todo = [i for i in range(len(reqs)) if i not in cached and i not in skip]
    report("pre-edit", len(reqs) - len(todo), len(reqs))
    chunk = 256
    for b in range(0, len(todo), chunk):
        idx = todo[b : b + chunk]
        obs = observe(model, tok, [reqs[i] for i in idx], scoring, perplexity=pre_ppl)
        for i, o in zip(idx, obs):
            cached[i] = o
        if obs_path is not None:
            _append_jsonl(obs_path, [{"index": i, "observation": o.to_dict()} for i, o in zip(idx, obs)])
        report("pre-edit", len(reqs) - len(todo) + b + len(idx), len(reqs))
    return [cached.get(i) for i in range(len(reqs))], pre_ppl


def load_run(directory: str | os.PathLike[str]) -> EvalRun:
    """Read a result directory (``manifest.json`` + ``records.jsonl`` [+ ``summary.json``]). An incomplete run is
    summarised from the records present (``summary["complete"]`` is False)."""
    d = Path(directory)
    mpath = d / "manifest.json"
    if not mpath.is_file():
        raise FileNotFoundError(f"{d} is not a kedit eval result directory (no manifest.json)")
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
    records = _read_jsonl(d / "records.jsonl")
    spath = d / "summary.json"
    complete = bool((manifest.get("state") or {}).get("complete"))
    if str((manifest.get("protocol") or {}).get("id", "")).startswith("lifelong"):
        from kedit.eval.lifelong import load_lifelong

        return load_lifelong(d, manifest, records, complete)
    if spath.is_file() and complete:
        summary = json.loads(spath.read_text(encoding="utf-8"))
    else:
        summary = summarize(records, manifest, seconds=(manifest.get("state") or {}).get("seconds"))
    summary["complete"] = complete
    return EvalRun(manifest, records, summary, d)
