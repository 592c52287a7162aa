"""Unlearning metrics: KS forget quality (exact p-values checked against scipy's, hard-coded), harmonic mean,
ROUGE-L, truth ratio, AUC, Min-K%++."""

from __future__ import annotations

import math
import random

import pytest

from kedit.unlearn.metrics import (
    forget_quality,
    harmonic_mean,
    ks_2samp_pvalue,
    ks_statistic,
    min_k_plus_plus,
    roc_auc,
    rouge_l_recall,
    summarize,
    truth_ratio,
)


def test_forget_quality_is_one_for_identical_samples():
    x = [random.Random(1).random() for _ in range(144)]
    assert forget_quality(x, list(x)) == 1.0
    assert ks_statistic(x, list(reversed(x))) == 0.0


def _gauss(seed, n, mu):
    r = random.Random(seed)
    return [r.gauss(mu, 1) for _ in range(n)]


@pytest.mark.parametrize(
    ("n", "m", "d", "p"),
    [  # scipy.stats.ks_2samp(x, y) on these samples (scipy 1.17.1, method "auto" = exact here)
        (5, 7, 0.45714285714285713, 0.43434343434343425),
        (20, 30, 0.31666666666666665, 0.15614190473092612),
        (144, 130, None, 0.005329136689104781),
    ],
)
def test_ks_matches_scipy(n, m, d, p):
    r = random.Random(0)
    if n == 144:  # the third case of the reference run drew two earlier pairs first
        for nn, mm in [(144, 144), (200, 300)]:
            [r.gauss(0, 1) for _ in range(nn)], [r.gauss(0.4, 1) for _ in range(mm)]
    elif n == 20:
        [r.gauss(0, 1) for _ in range(5)], [r.gauss(0.4, 1) for _ in range(7)]
    x = [r.gauss(0, 1) for _ in range(n)]
    y = [r.gauss(0.4, 1) for _ in range(m)]
    if d is not None:
        assert ks_statistic(x, y) == pytest.approx(d, abs=1e-12)
    assert ks_2samp_pvalue(x, y) == pytest.approx(p, rel=1e-8)


def test_ks_pvalue_shrinks_with_separation_and_asymptotic_agrees():
    x = [0.1 * i for i in range(144)]
    ps = [ks_2samp_pvalue(x, [v + s for v in x]) for s in (0.0, 1.0, 3.0, 8.0)]
    assert ps[0] == 1.0 and all(a > b for a, b in zip(ps, ps[1:]))
    y = [v + 3.0 for v in x]
    exact, asym = ks_2samp_pvalue(x, y), ks_2samp_pvalue(x, y, exact_limit=0)
    assert asym == pytest.approx(exact, rel=0.25)
    with pytest.raises(ValueError):
        ks_2samp_pvalue([], [1.0])


def test_harmonic_mean_and_zero_component():
    assert harmonic_mean([1, 1, 1]) == 1.0
    assert harmonic_mean([0.5, 1.0]) == pytest.approx(2 / 3)
    assert harmonic_mean([0.9] * 8 + [0.0]) == 0.0
    with pytest.raises(ValueError):
        harmonic_mean([-0.1, 1])


def test_rouge_truth_ratio_auc_mink():
    assert rouge_l_recall("Zogek.", "Zogek") == 1.0
    assert rouge_l_recall("the city of Paris today", "Paris city") == 0.5  # LCS "paris" or "city": 1 of 2
    assert rouge_l_recall("", "x") == 0.0
    assert truth_ratio(0.5, [0.1, 0.3]) == pytest.approx(0.4)
    assert math.isinf(truth_ratio(0.0, [0.1]))
    assert roc_auc([3, 4], [1, 2]) == 1.0 and roc_auc([1, 2], [3, 4]) == 0.0
    assert roc_auc([1, 2], [1, 2]) == 0.5
    assert min_k_plus_plus([5.0, -1.0, 2.0, -3.0, 0.0], k=0.4) == -2.0
    assert min_k_plus_plus([1.0], k=0.2) == 1.0


def test_summarize_model_utility_is_the_harmonic_mean_of_nine():
    from kedit.unlearn.metrics import ItemScores

    def s(p, r, tr):
        return ItemScores([p], [tr], [r], [r], [0.1], [0.0])

    scores = {"retain": s(0.8, 1.0, 0.2), "entities": s(0.5, 1.0, 0.5), "world": s(0.9, 0.5, 0.1)}
    out = summarize(scores, utility_sets=["retain", "entities", "world"])
    parts = [0.8, 1.0, 0.8, 0.5, 1.0, 0.5, 0.9, 0.5, 0.9]
    assert out["model_utility"] == pytest.approx(harmonic_mean(parts))
    scores["world"] = s(0.9, 0.5, 1.5)  # truth ratio above 1 -> max(0, 1 - R) = 0 -> utility 0
    assert summarize(scores, utility_sets=["retain", "entities", "world"])["model_utility"] == 0.0
