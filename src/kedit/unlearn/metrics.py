"""Unlearning metrics in TOFU's definitions (Maini et al., 2024, arXiv 2401.06121), named as open-unlearning names
them, plus membership inference.

Pure functions (no torch): :func:`ks_2samp_pvalue`, :func:`forget_quality`, :func:`harmonic_mean`,
:func:`rouge_l_recall`, :func:`truth_ratio`, :func:`roc_auc`, :func:`min_k_plus_plus`. Model-facing ones:
:func:`score_items` (teacher-forced answer log-probabilities, greedy answers), :func:`scope_metrics` (KnowUnDo's
token accuracy and perplexity of a scope) and :func:`summarize`.

* **Probability** ``P(a|q)^{1/|a|}`` (length-normalised); on option sets (testbed ``entities`` / ``world``, TOFU
  real authors / world facts) it is normalised over the options: ``p(a) / (p(a) + Σ p(â))``.
* **Truth ratio** ``R = mean_â P(â|q')^{1/|â|} / P(a|q')^{1/|a|}`` with ``q'`` the paraphrased question (testbed:
  a held-out template; TOFU paraphrases the answer instead, see :mod:`kedit.unlearn.splits`). Utility uses
  ``max(0, 1 - R)``.
* **ROUGE-L recall** of the greedy answer against the true answer (word level, lower-cased).
* **Forget quality**: the p-value of a two-sample Kolmogorov–Smirnov test between the truth ratios of the forget set
  under the unlearned model and under the retain model (1.0 for identical samples).
* **Model utility**: the harmonic mean of {probability, ROUGE-L, max(0, 1 - R)} over the utility sets (testbed:
  ``retain``, ``entities``, ``world``: nine numbers as in TOFU); 0 when any is 0.
* **Membership inference**: ROC AUC of telling forget items (trained on, then unlearned) from holdout items (never
  trained on) by the LOSS score (Yeom et al., 2018: lower answer NLL ⇒ member) and by Min-K%++ (Zhang et al., 2024,
  arXiv 2404.02936: per token ``(log p(x_t) − μ_t) / σ_t`` with μ, σ the mean and standard deviation of
  ``log p(·)`` under the model's own next-token distribution, averaged over the lowest k % of tokens). 0.5 = no
  signal; the retain model's AUC is the reference an ideal unlearned model matches.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ItemScores",
    "forget_quality",
    "harmonic_mean",
    "ks_2samp_pvalue",
    "ks_statistic",
    "min_k_plus_plus",
    "roc_auc",
    "rouge_l_recall",
    "scope_metrics",
    "score_items",
    "summarize",
    "truth_ratio",
]


# -- statistics ---------------------------------------------------------------------------------------------------
def ks_statistic(x: Sequence[float], y: Sequence[float]) -> float:
    """The two-sample Kolmogorov–Smirnov statistic ``D = sup_t |F_x(t) − F_y(t)|``."""
    if not x or not y:
        raise ValueError("the KS test needs two non-empty samples")
    xs, ys = sorted(x), sorted(y)
    n, m = len(xs), len(ys)
    i = j = 0
    d = 0.0
    while i < n and j < m:
        t = min(xs[i], ys[j])
        while i < n and xs[i] <= t:
            i += 1
        while j < m and ys[j] <= t:
            j += 1
        d = max(d, abs(i / n - j / m))
    return d


def _exact_two_sided(n: int, m: int, d: float) -> float:
    """P(D ≥ d) under H0 for sample sizes n, m: lattice paths from (0,0) to (n,m) staying strictly inside
    ``|i/n − j/m| < d`` (Hodges, 1958), counted with a rolling row in log-free scaled arithmetic."""
    # work in integers: |i*m − j*n| < d*n*m, with a tolerance for floating d
    bound = d * n * m - 1e-7 * max(n, m)
    row = [0.0] * (m + 1)
    for j in range(m + 1):
        row[j] = 1.0 if abs(0 * m - j * n) < bound and (j == 0 or row[j - 1] > 0) else 0.0
    # normalise by C(n+m, n) progressively to avoid overflow: divide each step's counts
    log_scale = 0.0
    for i in range(1, n + 1):
        new = [0.0] * (m + 1)
        for j in range(m + 1):
            if abs(i * m - j * n) >= bound:
                continue
            new[j] = row[j] + (new[j - 1] if j > 0 else 0.0)
        s = max(new) or 1.0
        row = [v / s for v in new]
        log_scale += math.log(s)
    log_inside = (math.log(row[m]) + log_scale) if row[m] > 0 else -math.inf
    log_total = math.lgamma(n + m + 1) - math.lgamma(n + 1) - math.lgamma(m + 1)
    return min(1.0, max(0.0, 1.0 - math.exp(log_inside - log_total)))


def _kolmogorov_sf(t: float) -> float:
    """Survival function of the Kolmogorov distribution, ``2 Σ (−1)^{k−1} exp(−2 k² t²)``."""
    if t <= 0:
        return 1.0
    s = 0.0
    for k in range(1, 101):
        term = 2 * (-1) ** (k - 1) * math.exp(-2 * k * k * t * t)
        s += term
        if abs(term) < 1e-16:
            break
    return min(1.0, max(0.0, s))


def ks_2samp_pvalue(x: Sequence[float], y: Sequence[float], *, exact_limit: int = 1_000_000) -> float:
    """Two-sided p-value of the two-sample KS test (scipy's ``ks_2samp`` without scipy).

    Exact (lattice-path count, as scipy's default for these sizes) when ``len(x) * len(y) ≤ exact_limit``, else the asymptotic Kolmogorov distribution
    with Stephens' small-sample correction. Identical samples give D = 0 and p = 1.
    """
    d = ks_statistic(x, y)
    if d == 0.0:
        return 1.0
    n, m = len(x), len(y)
    if n * m <= exact_limit:
        return _exact_two_sided(n, m, d)
    en = math.sqrt(n * m / (n + m))
    return _kolmogorov_sf((en + 0.12 + 0.11 / en) * d)


def forget_quality(unlearned_truth_ratios: Sequence[float], retain_truth_ratios: Sequence[float]) -> float:
    """TOFU forget quality: the KS p-value between the forget-set truth ratios of the two models."""
    return ks_2samp_pvalue(unlearned_truth_ratios, retain_truth_ratios)


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean of non-negative numbers; 0 if any is 0 (TOFU's model utility)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("harmonic mean of nothing")
    if any(v < 0 or math.isnan(v) for v in vals):
        raise ValueError(f"harmonic mean needs non-negative numbers, got {vals}")
    if any(v == 0 for v in vals):
        return 0.0
    return len(vals) / sum(1 / v for v in vals)


def truth_ratio(p_true: float, p_perturbed: Sequence[float]) -> float:
    """``mean(p_perturbed) / p_true`` of length-normalised probabilities (``inf`` if ``p_true`` is 0)."""
    if not p_perturbed:
        raise ValueError("truth ratio needs at least one perturbed answer")
    mean = sum(p_perturbed) / len(p_perturbed)
    return math.inf if p_true <= 0 else mean / p_true


_WORD = re.compile(r"\w+", re.UNICODE)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall: LCS(prediction, reference) / |reference| over lower-cased words."""
    ref, pred = _words(reference), _words(prediction)
    if not ref:
        return 0.0
    prev = [0] * (len(pred) + 1)
    for r in ref:
        cur = [0] * (len(pred) + 1)
        for j, p in enumerate(pred, 1):
            cur[j] = prev[j - 1] + 1 if r == p else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1] / len(ref)


def roc_auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """ROC AUC of scores where higher means "positive" (ties count one half): P(s_pos > s_neg)."""
    if not positive or not negative:
        raise ValueError("AUC needs positive and negative scores")
    neg = sorted(negative)
    total = 0.0
    import bisect

    for s in positive:
        lo = bisect.bisect_left(neg, s)
        hi = bisect.bisect_right(neg, s)
        total += lo + 0.5 * (hi - lo)
    return total / (len(positive) * len(neg))


def min_k_plus_plus(token_scores: Sequence[float], k: float = 0.2) -> float:
    """Mean of the lowest ``k`` fraction (at least one) of per-token Min-K%++ scores."""
    if not token_scores:
        raise ValueError("Min-K%++ of an empty answer")
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    s = sorted(token_scores)
    n = max(1, int(len(s) * k))
    return sum(s[:n]) / n


# -- model-facing --------------------------------------------------------------------------------------------------
@dataclass
class ItemScores:
    """Per-item measurements of one QA set on one model."""

    prob: list[float]  # P(a|q)^{1/|a|}, normalised over the options when the set is an option set
    truth_ratio: list[float]
    rouge: list[float]
    recall: list[float]  # 1.0 when the greedy answer starts with the true answer
    nll: list[float]  # mean answer-token NLL after q (LOSS attack score: lower = member)
    mink_pp: list[float]  # Min-K%++ score after q (higher = member)


def _tokens_logp_and_mink(model: Any, tok: Any, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[Any]:
    """Per pair: (answer token log-probs, per-token Min-K%++ z-scores)."""
    import torch

    from kedit.core.batching import device_of, pad_batch, pad_id
    from kedit.core.keys import target_ids

    device = device_of(model)
    enc = []
    for q, a in pairs:
        p = list(tok(q, add_special_tokens=True)["input_ids"])
        enc.append((p, target_ids(tok, a)))
    out: list[Any] = [None] * len(enc)
    order = sorted(range(len(enc)), key=lambda i: len(enc[i][0]) + len(enc[i][1]))
    with torch.no_grad():
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            ids, mask = pad_batch([enc[i][0] + enc[i][1] for i in idx], pad_id(tok), device)
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            probs = logp.exp()
            mu = (probs * logp).sum(-1)
            sigma = ((probs * logp.pow(2)).sum(-1) - mu.pow(2)).clamp_min(1e-12).sqrt()
            nxt = logp[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)  # log p of each next token
            z = (nxt - mu[:, :-1]) / sigma[:, :-1]
            nxt, z = nxt.cpu(), z.cpu()
            for r, i in enumerate(idx):
                p, a = enc[i]
                sl = slice(len(p) - 1, len(p) + len(a) - 1)
                out[i] = (nxt[r, sl].tolist(), z[r, sl].tolist())
    return out


def score_items(
    model: Any,
    tok: Any,
    items: Sequence[Any],
    *,
    options: bool = False,
    batch_size: int = 64,
    generate: bool = True,
    teacher_forced: bool = True,
    mink_k: float = 0.2,
) -> ItemScores:
    """Measure ``items`` (:class:`~kedit.unlearn.splits.QAItem`) on ``model``.

    ``options``: normalise the probability over the true and perturbed answers (TOFU's real-authors / world-facts
    convention). ``generate=False`` skips the greedy answers (ROUGE and recall are then empty lists),
    ``teacher_forced=False`` the probabilities (only ROUGE and recall are filled).
    """
    from kedit.api import greedy_answers
    from kedit.core.keys import target_ids

    pairs: list[tuple[str, str]] = []
    for it in items if teacher_forced else ():
        # TOFU items paraphrase the answer (ratio after the question), testbed items the question
        pq = it.question if it.paraphrased_answer else (it.paraphrased_question or it.question)
        pairs.append((it.question, it.answer))
        pairs.append((pq, it.paraphrased_answer or it.answer))
        pairs += [(pq, x) for x in it.perturbed_answers]
        if options:
            pairs += [(it.question, x) for x in it.perturbed_answers]
    scored = _tokens_logp_and_mink(model, tok, pairs, batch_size)
    res = ItemScores([], [], [], [], [], [])
    pos = 0

    def norm_p(lp: list[float]) -> float:
        return math.exp(sum(lp) / len(lp))

    for it in items if teacher_forced else ():
        n_pert = len(it.perturbed_answers)
        lp_q, z_q = scored[pos]
        lp_pq = scored[pos + 1][0]
        pert = [norm_p(scored[pos + 2 + k][0]) for k in range(n_pert)]
        pos += 2 + n_pert
        p = norm_p(lp_q)
        if options:
            opts = [norm_p(scored[pos + k][0]) for k in range(n_pert)]
            pos += n_pert
            p = p / (p + sum(opts))
        res.prob.append(p)
        res.truth_ratio.append(truth_ratio(norm_p(lp_pq), pert) if n_pert else 1.0)
        res.nll.append(-sum(lp_q) / len(lp_q))
        res.mink_pp.append(min_k_plus_plus(z_q, mink_k))
    if generate and items:
        n_new = max(len(target_ids(tok, it.answer)) for it in items) + 2
        gens = greedy_answers(model, tok, [it.question for it in items], max_new_tokens=n_new, batch_size=batch_size)
        for it, g in zip(items, gens):
            res.rouge.append(rouge_l_recall(g, it.answer))
            res.recall.append(1.0 if _words(g)[: len(_words(it.answer))] == _words(it.answer) else 0.0)
    return res


def scope_metrics(model: Any, tok: Any, items: Sequence[Any], *, batch_size: int = 64, max_length: int = 512) -> dict:
    """KnowUnDo's per-scope metrics (Tian et al., 2024, arXiv 2407.01920) over the answer tokens of ``items``
    (``question ␣answer``, encoded as unlearning trains on it, cut at ``max_length`` or the model's context),
    pooled over all tokens of the scope:

    * ``token_accuracy``: the fraction of answer tokens whose argmax next-token prediction is the label (KnowUnDo
      prints it as a percentage);
    * ``perplexity``: ``exp(−mean log p)`` of the answer tokens;
    * ``first_token_accuracy`` (kedit's addition): the same over each answer's first token only. Teacher-forced
      continuations of a multi-token name stay predictable once its first piece is given, so token accuracy has a
      floor that says little about the fact.
    """
    import torch

    from kedit.core.batching import device_of, pad_id

    from .methods.base import collate, encode_qa
    from .methods.losses import _shift

    if not items:
        raise ValueError("scope metrics of an empty scope")
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    max_length = min(max_length, limit) if limit else max_length  # longer items are cut at the model's context
    device = device_of(model)
    enc = [encode_qa(tok, it.question, it.answer, max_length) for it in items]
    fn = collate(pad_id(tok))
    correct = count = first_correct = n_first = 0
    logp_sum = 0.0
    with torch.no_grad():
        for b in range(0, len(enc), batch_size):
            batch = fn([{"forget": x} for x in enc[b : b + batch_size]])
            ids, mask, labels = (batch[f"forget_{k}"].to(device) for k in ("input_ids", "attention_mask", "labels"))
            lg, lb, m = _shift(model(input_ids=ids, attention_mask=mask).logits, labels)
            lp = torch.log_softmax(lg, dim=-1).gather(2, lb[..., None]).squeeze(2)
            hit = (lg.argmax(-1) == lb) & m
            correct += int(hit.sum())
            first = m & (m.cumsum(1) == 1)  # the first answer token of each row
            first_correct += int((hit & first).sum())
            n_first += int(first.sum())
            count += int(m.sum())
            logp_sum += float((lp * m).sum())
    return {
        "token_accuracy": correct / count,
        "perplexity": math.exp(-logp_sum / count),
        "first_token_accuracy": first_correct / n_first,
        "tokens": count,
    }


def _mean(v: Sequence[float]) -> float:
    return sum(v) / len(v) if v else float("nan")


def summarize(
    scores: dict[str, ItemScores],
    *,
    utility_sets: Sequence[str],
    retain_forget_truth_ratios: Sequence[float] | None = None,
    retain_mia: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Open-unlearning style summary of per-set scores (``forget``, the utility sets, optional ``holdout``).

    Returns ``forget_quality`` (when the retain model's forget truth ratios are given), ``model_utility``, and per
    set ``<set>_Q_A_Prob``, ``<set>_Q_A_ROUGE``, ``<set>_Truth_Ratio`` (mean R), ``<set>_recall``; with a
    ``holdout`` set also ``mia_loss_auc`` and ``mia_min_k_plus_plus_auc``.
    """
    out: dict[str, Any] = {}
    for name, s in scores.items():
        out[f"{name}_Q_A_Prob"] = _mean(s.prob)
        out[f"{name}_Q_A_ROUGE"] = _mean(s.rouge)
        out[f"{name}_Truth_Ratio"] = _mean([min(r, 1e6) for r in s.truth_ratio])
        out[f"{name}_recall"] = _mean(s.recall)
    parts = []
    for name in utility_sets:
        s = scores[name]
        parts += [_mean(s.prob), _mean(s.rouge), _mean([max(0.0, 1.0 - r) for r in s.truth_ratio])]
    out["model_utility"] = harmonic_mean(parts) if parts else float("nan")
    if retain_forget_truth_ratios is not None and "forget" in scores:
        out["forget_quality"] = forget_quality(scores["forget"].truth_ratio, retain_forget_truth_ratios)
    if "holdout" in scores and "forget" in scores:
        f, h = scores["forget"], scores["holdout"]
        out["mia_loss_auc"] = roc_auc([-x for x in f.nll], [-x for x in h.nll])
        out["mia_min_k_plus_plus_auc"] = roc_auc(f.mink_pp, h.mink_pp)
    if retain_mia:
        out.update({f"retain_{k}": v for k, v in retain_mia.items()})
    return out
