"""Protocol ``unlearn/v1``: measure a model on an unlearning split, against a retain model.

Sets measured (testbed): ``forget`` (all), ``retain`` (a seeded sample of ``retain_eval_size`` = 400 facts, TOFU's
retain-evaluation size), ``entities`` and ``world`` (option-normalised probability), ``holdout`` (never-trained
persons, teacher-forced only, for membership inference). ``untouched_recall`` is greedy recall over *every* fact
outside the forget set (all retain persons' facts, company and geography facts).

The retain model (:mod:`kedit.unlearn.retain_model`) is measured the same way; its forget-set truth ratios are the
reference of ``forget_quality`` and its utility is ``retain_model_utility``. Metric names follow open-unlearning
(``forget_quality``, ``model_utility``, ``forget_Q_A_Prob``, ``forget_Truth_Ratio``, ``forget_Q_A_ROUGE``...).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from .metrics import ItemScores, scope_metrics, score_items, summarize
from .splits import UnlearnSplit

__all__ = [
    "PROTOCOL_ID",
    "UTILITY_SETS",
    "Reference",
    "evaluate_model",
    "measure_sets",
    "reference_from",
    "scope_summary",
    "trajectory_probe",
]

PROTOCOL_ID = "unlearn/v1"
UTILITY_SETS = ("retain", "entities", "world")
RETAIN_EVAL_SIZE = 400


@dataclass
class Reference:
    """What the retain model contributes: its forget-set truth ratios, its utility and its MIA AUCs."""

    forget_truth_ratios: list[float]
    model_utility: float
    summary: dict[str, Any]


def _retain_sample(split: UnlearnSplit, n: int, seed: int = 0) -> list[Any]:
    if len(split.retain) <= n:
        return list(split.retain)
    idx = sorted(random.Random(seed * 7 + 400).sample(range(len(split.retain)), n))
    return [split.retain[i] for i in idx]


def _cap(items: list[Any], n: int | None, salt: int) -> list[Any]:
    if n is None or len(items) <= n:
        return list(items)
    idx = sorted(random.Random(salt).sample(range(len(items)), n))
    return [items[i] for i in idx]


def measure_sets(
    model: Any, tok: Any, split: UnlearnSplit, *, batch_size: int = 128, max_items: int | None = None
) -> dict[str, ItemScores]:
    """Per-set scores of ``model`` on ``split`` (sets that the split lacks are skipped); ``max_items`` caps every
    set by a seeded sample (quick checks; the protocol's figures use ``None``)."""
    sets: dict[str, tuple[list[Any], bool, bool]] = {"forget": (_cap(split.forget, max_items, 1), False, True)}
    if split.retain:
        sets["retain"] = (_cap(_retain_sample(split, RETAIN_EVAL_SIZE), max_items, 2), False, True)
    for k, (name, items) in enumerate(sorted(split.extra.items())):
        if items:
            sets[name] = (_cap(items, max_items, 3 + k), True, True)
    if split.holdout:
        sets["holdout"] = (_cap(split.holdout, max_items, 99), False, False)
    return {
        name: score_items(model, tok, items, options=opt, generate=gen, batch_size=batch_size)
        for name, (items, opt, gen) in sets.items()
    }


def _untouched_recall(model: Any, tok: Any, split: UnlearnSplit, batch_size: int, max_items: int | None) -> float:
    items = _cap(list(split.retain) + [it for _, v in sorted(split.extra.items()) for it in v], max_items, 5)
    if not items:
        return float("nan")
    sc = score_items(model, tok, items, batch_size=batch_size, teacher_forced=False)
    return sum(sc.recall) / len(sc.recall)


def reference_from(
    model: Any, tok: Any, split: UnlearnSplit, *, batch_size: int = 128, max_items: int | None = None
) -> Reference:
    """Measure the retain model on ``split`` once (reuse it for every method)."""
    scores = measure_sets(model, tok, split, batch_size=batch_size, max_items=max_items)
    usets = [s for s in UTILITY_SETS if s in scores]
    summary = summarize(scores, utility_sets=usets)
    return Reference(list(scores["forget"].truth_ratio), summary["model_utility"], summary)


def scope_summary(model: Any, tok: Any, split: UnlearnSplit, *, batch_size: int = 128) -> dict[str, float]:
    """``<scope>_token_accuracy`` and ``<scope>_perplexity`` for every KnowUnDo scope of ``split`` (``unlearn``,
    ``retention``; nothing when the split has no scopes). Scopes are measured whole (no ``max_items`` cap)."""
    out: dict[str, float] = {}
    for name, items in sorted(split.scopes.items()):
        if items:
            m = scope_metrics(model, tok, items, batch_size=batch_size)
            out[f"{name}_token_accuracy"] = m["token_accuracy"]
            out[f"{name}_perplexity"] = m["perplexity"]
            out[f"{name}_first_token_accuracy"] = m["first_token_accuracy"]
    return out


def evaluate_model(
    model: Any,
    tok: Any,
    split: UnlearnSplit,
    reference: Reference | None = None,
    *,
    batch_size: int = 128,
    untouched: bool = True,
    max_items: int | None = None,
) -> dict[str, Any]:
    """The ``unlearn/v1`` metrics of ``model`` on ``split``; with a ``reference`` (the retain model) also
    ``forget_quality``, ``retain_model_utility`` and the retain model's MIA AUCs (``retain_model_mia_*``).
    ``max_items`` caps every set (see :func:`measure_sets`; give the reference the same cap). A split with KnowUnDo
    scopes adds :func:`scope_summary`'s token accuracy and perplexity per scope."""
    scores = measure_sets(model, tok, split, batch_size=batch_size, max_items=max_items)
    usets = [s for s in UTILITY_SETS if s in scores]
    out = summarize(
        scores,
        utility_sets=usets,
        retain_forget_truth_ratios=reference.forget_truth_ratios if reference else None,
    )
    if reference is not None:
        out["retain_model_utility"] = reference.model_utility
        for k in ("mia_loss_auc", "mia_min_k_plus_plus_auc", "forget_Truth_Ratio", "forget_Q_A_Prob"):
            if k in reference.summary:
                out[f"retain_model_{k}"] = reference.summary[k]
    out.update(scope_summary(model, tok, split, batch_size=batch_size))
    if untouched:
        out["untouched_recall"] = _untouched_recall(model, tok, split, batch_size, max_items)
    out["protocol"] = PROTOCOL_ID
    return out


def _median(v: list[float]) -> float:
    s = sorted(v)
    n = len(s)
    if not n:
        return float("nan")
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def trajectory_probe(
    tok: Any,
    split: UnlearnSplit,
    reference: Reference | None = None,
    *,
    groups: dict[str, list[int]] | None = None,
    batch_size: int = 128,
    max_items: int | None = None,
) -> Any:
    """A :data:`kedit.unlearn.run.Probe` of the cheap metrics, for ``unlearn(..., probe=...)`` (``--trajectory``):

    * ``forget_quality`` (KS p-value against ``reference``'s forget truth ratios, which are fixed, so measured once
      beforehand), ``forget_Truth_Ratio`` (mean, capped at 1e6 as :func:`summarize` does),
      ``forget_truth_ratio_median``, ``forget_Q_A_Prob`` -- teacher-forced only, no generation, on the same forget
      items (and the same ``max_items`` cap) as :func:`evaluate_model`, so the last epoch's figures equal the final
      evaluation's;
    * per group ``g`` of ``groups`` (indices into those forget items, e.g. the person halves of
      :func:`kedit.unlearn.splits.forget_halves`): ``forget_quality_<g>`` (KS against the reference's truth ratios on
      the same items), ``forget_truth_ratio_median_<g>``;
    * on a scope split: :func:`scope_summary`'s token accuracies and perplexities.
    """
    from .metrics import forget_quality as ks_fq

    items = _cap(split.forget, max_items, 1)
    ref_tr = list(reference.forget_truth_ratios) if reference is not None else None
    if ref_tr is not None and len(ref_tr) != len(items):
        raise ValueError(f"the reference has {len(ref_tr)} forget truth ratios for {len(items)} forget items "
                         "(give reference_from the same max_items)")
    for g, idx in (groups or {}).items():
        if not idx or any(not 0 <= i < len(items) for i in idx):
            raise ValueError(f"group {g!r} is empty or indexes outside the {len(items)} forget items")

    def probe(model: Any, where: dict[str, Any]) -> dict[str, Any]:
        s = score_items(model, tok, items, generate=False, batch_size=batch_size)
        tr = list(s.truth_ratio)
        rec: dict[str, Any] = {
            "forget_Truth_Ratio": sum(min(r, 1e6) for r in tr) / len(tr),
            "forget_truth_ratio_median": _median(tr),
            "forget_Q_A_Prob": sum(s.prob) / len(s.prob),
        }
        if ref_tr is not None:
            rec["forget_quality"] = ks_fq(tr, ref_tr)
            for g, idx in (groups or {}).items():
                rec[f"forget_quality_{g}"] = ks_fq([tr[i] for i in idx], [ref_tr[i] for i in idx])
        for g, idx in (groups or {}).items():
            rec[f"forget_truth_ratio_median_{g}"] = _median([tr[i] for i in idx])
        if split.scopes:
            rec.update(scope_summary(model, tok, split, batch_size=batch_size))
        return rec

    return probe
