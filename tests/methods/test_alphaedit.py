"""AlphaEdit invariants (Fang et al., ICLR 2025) on tiny gpt2/llama models: Δ(I−P) = 0 with the projector cached in
``ctx.state["alphaedit"]``, preserved keys are (nearly) annihilated, the projected normal equations hold, a delta
carries its batch's keys (recomputed on the edited model) and, once applied, its K Kᵀ enters the next batch's solve;
the key cache is rolled back with the weights (a reverted or never-applied delta leaves no state behind)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from lte_common import (
    LAYERS,
    REQS,
    TEMPLATES,
    apply_revert_exact,
    assert_close_rel,
    config,
    ctx,
    math_delta,
    model,
    second_moment,
    snapshot,
    stages,
    tok,
    unchanged,
)

from kedit.arch import get_adapter
from kedit.core.keys import compute_keys
from kedit.core.walk import request_keys
from kedit.deltas import load_delta
from kedit.methods.alphaedit import KEYS_EXTRA, alphaedit_state, previous_key_moments
from kedit.methods.registry import get_method
from kedit.requests import EditRequest
from kedit.testing import TINY_TEXT

KW = {"nullspace_mode": "relative", "nullspace_threshold": 0.05, "l2": 0.5}


def _corpus_keys(m, layer):
    """Keys of every token of a few corpus sentences (the 'preserved knowledge' K_0), [d_k, N]."""
    sents = [s.strip() + "." for s in TINY_TEXT.split(".") if s.strip()][:8]
    texts, spans = [], []
    for s in sents:
        ids = tok()(s, return_offsets_mapping=True)["offset_mapping"]
        for a, b in ids:
            texts.append(s)
            spans.append((a, b))
    return compute_keys(m, tok(), get_adapter(m), [layer], texts, spans)[layer].double().T


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_alphaedit_invariants_and_key_cache(arch):
    m = model(arch)
    spec = get_method("alphaedit")
    cfg = config("alphaedit", **KW)
    c = ctx()
    before = snapshot(m)
    delta = spec.compute(m, tok(), REQS, cfg, c)
    assert unchanged(m, before)
    state = alphaedit_state(c)
    mk = c.model_key(m)
    assert not state["key_cache"]  # compute changes no state for the delta it returns
    bases = {l: state["nullspace"][(mk, l, 0.05, "relative", cfg.mom2_n_tokens)] for l in LAYERS}
    for st in stages(delta):
        layer = st["layer"]
        U = bases[layer].double().cpu()
        P = U @ U.T
        I = torch.eye(P.shape[0], dtype=torch.float64)
        delta_j = math_delta(m, delta, layer)
        assert float((delta_j @ (I - P)).norm()) <= 1e-5 * float(delta_j.norm())
        K, R = st["K"], st["R"]
        A = K @ K.T  # first batch: no previous keys
        assert_close_rel(delta_j @ (P @ A @ P + cfg.l2 * P), R @ K.T @ P)
        # preserved keys: ‖ΔK_0‖ ≤ ‖Δ‖₂‖PK_0‖ and PK_0 holds a small part of K_0's energy
        K0 = _corpus_keys(m, layer)
        bound = torch.linalg.matrix_norm(delta_j, ord=2) * (P @ K0).norm()
        assert (delta_j @ K0).norm() <= bound * (1 + 1e-6)
        assert (P @ K0).norm() < 0.3 * K0.norm()
    # the delta carries the keys recomputed on the edited model; applied, they are the key cache K_pK_pᵀ
    assert previous_key_moments(m, c, LAYERS) == ({l: None for l in LAYERS}, 0)
    delta.apply(m)
    try:
        K_edit = request_keys(m, tok(), get_adapter(m), LAYERS, REQS, TEMPLATES)
        kp, n = previous_key_moments(m, c, LAYERS)
    finally:
        delta.revert(m)
    assert n == 1
    for l in LAYERS:
        Kl = K_edit[l].double()
        assert torch.allclose(delta.extras[f"{KEYS_EXTRA}{l}"].double(), Kl, atol=1e-6)
        assert torch.allclose(kp[l], Kl.T @ Kl, atol=1e-5)
    assert previous_key_moments(m, c, LAYERS) == ({l: None for l in LAYERS}, 0)  # rolled back with the weights
    apply_revert_exact(m, delta)


def test_alphaedit_sequential_uses_previous_keys():
    m = model("llama")
    spec = get_method("alphaedit")
    cfg = config("alphaedit", layers=(1, 2), **KW)
    c = ctx()
    first = spec.compute(m, tok(), REQS[:1], cfg, c)
    state = alphaedit_state(c)
    basis_obj = state["nullspace"][(c.model_key(m), 1, 0.05, "relative", cfg.mom2_n_tokens)]
    first.apply(m)
    try:
        kp, _ = previous_key_moments(m, c, (1, 2))
        second = spec.compute(m, tok(), REQS[1:], cfg, c)
    finally:
        first.revert(m)
    assert second.meta["alphaedit"]["previous_batches"] == 1
    assert state["nullspace"][(c.model_key(m), 1, 0.05, "relative", cfg.mom2_n_tokens)] is basis_obj  # cached
    for st in stages(second):
        layer = st["layer"]
        U = state["nullspace"][(c.model_key(m), layer, 0.05, "relative", cfg.mom2_n_tokens)].double().cpu()
        P = U @ U.T
        K, R = st["K"], st["R"]
        A = K @ K.T + kp[layer]
        assert_close_rel(math_delta(m, second, layer) @ (P @ A @ P + cfg.l2 * P), R @ K.T @ P)


def test_alphaedit_empty_nullspace_is_an_error():
    m = model("gpt2")
    cfg = config("alphaedit", nullspace_mode="absolute", nullspace_threshold=1e-12)
    c = ctx()
    with pytest.raises(ValueError, match="AlphaEdit layer 0: no eigenvalue"):
        get_method("alphaedit").compute(m, tok(), [EditRequest("{} is in", "Berlin", "France")], cfg, c)
    assert not alphaedit_state(c)["key_cache"]


def _same_delta(a, b):
    assert [u.param for u in a.updates] == [u.param for u in b.updates]
    for ua, ub in zip(a.updates, b.updates):
        assert all(torch.equal(ta, tb) for ta, tb in zip(ua.tensors().values(), ub.tensors().values()))
    assert a.extras.keys() == b.extras.keys() and all(torch.equal(a.extras[k], b.extras[k]) for k in a.extras)


def test_alphaedit_reverted_or_unapplied_edit_leaves_no_keys_behind():
    """Issue #11 item 2: one context reused across single edits (apply, revert) must not leak keys."""
    m = model("llama")
    spec = get_method("alphaedit")
    cfg = config("alphaedit", layers=(1, 2), **KW)
    fresh = spec.compute(m, tok(), REQS[1:], cfg, ctx())
    c = ctx()
    first = spec.compute(m, tok(), REQS[:1], cfg, c)
    never_applied = spec.compute(m, tok(), REQS[:1], cfg, c)  # computed, never applied: no effect
    with first.applied(m):
        pass
    second = spec.compute(m, tok(), REQS[1:], cfg, c)
    _same_delta(second, fresh)
    assert second.meta["alphaedit"]["previous_batches"] == 0
    assert second.meta["alphaedit"]["previous_key_energy"] == fresh.meta["alphaedit"]["previous_key_energy"]
    _same_delta(never_applied, first)


def test_alphaedit_saved_delta_brings_its_keys_back(tmp_path):
    m = model("gpt2")
    spec = get_method("alphaedit")
    cfg = config("alphaedit", **KW)
    c = ctx()
    first = spec.compute(m, tok(), REQS[:1], cfg, c)
    with first.applied(m):
        kp, _ = previous_key_moments(m, c, LAYERS)
        second = spec.compute(m, tok(), REQS[1:], cfg, c)
    first.save(tmp_path / "first")
    loaded = load_delta(tmp_path / "first")
    c2 = ctx()
    spec.compute(m, tok(), REQS[:1], cfg, c2)  # statistics and projector of the base model, as on c
    with loaded.applied(m):
        kp2, n = previous_key_moments(m, c2, LAYERS)
        second2 = spec.compute(m, tok(), REQS[1:], cfg, c2)
    assert n == 1 and all(torch.equal(kp[l], kp2[l]) for l in LAYERS)
    _same_delta(second, second2)


def test_alphaedit_key_memo_matches_the_fold_from_scratch():
    """The memo on the context, extended edit by edit, is bitwise the sum rebuilt from the applied deltas."""
    m = model("gpt2")
    spec = get_method("alphaedit")
    cfg = config("alphaedit", **KW)
    c = ctx()
    deltas = []
    try:
        for r in REQS:
            d = spec.compute(m, tok(), [r], cfg, c)
            deltas.append(d.apply(m))
        memo, n = previous_key_moments(m, c, LAYERS)
        scratch, _ = previous_key_moments(m, ctx(), LAYERS)
        assert n == len(REQS) and all(torch.equal(memo[l], scratch[l]) for l in LAYERS)
        without = spec.compute(m, tok(), [REQS[0]], config("alphaedit", accumulate_keys=False, **KW), c)
        assert not without.extras
    finally:
        for d in reversed(deltas):
            d.revert(m)
    assert previous_key_moments(m, c, LAYERS) == ({l: None for l in LAYERS}, 0)


@pytest.mark.parametrize("mode,tau", [("relative", 0.05), ("absolute", 1e-3)])
def test_alphaedit_update_annihilates_the_preserved_keys_up_to_the_threshold(mode, tau):
    """Δ = ΔP with P onto the eigenvectors of C below the threshold t (τ, or τ·max for "relative"), so the mean
    squared change on the preserved keys, tr(Δ C Δᵀ) = E‖Δk‖², is at most t·‖Δ‖²_F -- and it is not zero (the
    approximate null space is not exact), i.e. the bound is the threshold rule and nothing stronger."""
    m = model("gpt2")
    c = ctx()
    delta = get_method("alphaedit").compute(m, tok(), REQS, config("alphaedit", **{**KW, "nullspace_mode": mode,
                                                                                 "nullspace_threshold": tau}), c)
    for layer in LAYERS:
        C = second_moment(m, c, layer)
        t = tau * float(torch.linalg.eigvalsh(C).max()) if mode == "relative" else tau
        D = math_delta(m, delta, layer)
        moved = float(torch.trace(D @ C @ D.T))
        assert 0 < moved <= t * float(D.norm()) ** 2 * (1 + 1e-9)
        # an unprojected update of the same size moves the preserved keys far more
        assert moved < 0.5 * float(torch.trace(C)) / C.shape[0] * float(D.norm()) ** 2
