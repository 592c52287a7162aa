"""Per-item saturation of the forget term (``saturation``) and the KL retain term (``retain_loss="kl"``):

* a weighted NPO / SimNPO loss equals the plain one with all weights 1, and a weight-0 item gets no gradient;
* the saturation mask is 1 below an item's level, 0 at or above it;
* ``saturation_levels`` are the original model's holdout NLLs (per relation quantile, or a per-relation seeded
  pairing) -- nothing else goes in;
* plumbing, end to end: levels that never bind give the bitwise delta of the plain run, levels that always bind the
  delta of a run without forget term (``forget_weight=0``);
* the KL retain term is 0 at the original and > 0 away from it; unsupported combinations are refused.
"""

from __future__ import annotations

import math

import pytest
import torch

import kedit.unlearn.run as run_mod
from kedit.unlearn.methods.base import ForgetRetainData, UnlearnTrainer, collate
from kedit.unlearn.methods.losses import npo_loss, sequence_nll, simnpo_loss
from kedit.unlearn.metrics import score_items
from kedit.unlearn.run import make_config, saturation_levels, unlearn


def _seq():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (4, 6), generator=g)
    labels[:, :2] = -100
    return logits, labels


@pytest.mark.parametrize("kind", ["npo", "simnpo"])
def test_weighted_losses_equal_plain_with_ones_and_zero_weight_items_get_no_gradient(kind):
    logits, labels = _seq()
    nll, n = sequence_nll(logits, labels)

    def loss(w):
        if kind == "npo":
            return npo_loss(-nll, (-nll).detach() + 0.7, 0.1, w)
        return simnpo_loss(nll / n, 4.5, 0.5, w)

    assert torch.equal(loss(None), loss(torch.ones(4)))
    w = torch.tensor([1.0, 0.0, 1.0, 0.0])
    g = torch.autograd.grad(loss(w), logits, retain_graph=True)[0]
    assert torch.all(g[1] == 0) and torch.all(g[3] == 0)
    assert g[0].abs().sum() > 0 and g[2].abs().sum() > 0
    # a saturated item adds 0 and the mean stays over the batch
    per = torch.stack([loss(torch.eye(4)[i]) for i in range(4)])
    assert float(loss(w).detach()) == pytest.approx(float((per[0] + per[2]).detach()), rel=1e-6)


def test_saturation_mask_is_one_below_the_level_and_zero_at_or_above():
    nll = torch.tensor([0.5, 2.0, 3.0, 4.0], requires_grad=True)
    m = UnlearnTrainer.saturation_mask({"forget_cap": torch.tensor([1.0, 2.0, 5.0, 3.9])}, nll)
    assert m.tolist() == [1.0, 0.0, 1.0, 0.0] and not m.requires_grad
    assert UnlearnTrainer.saturation_mask({}, nll) is None


def test_collate_carries_the_levels_only_when_given(gpt2, split):
    _, tok = gpt2
    plain = ForgetRetainData(tok, split.forget[:3], split.retain, seed=0, max_length=64)
    capped = ForgetRetainData(tok, split.forget[:3], split.retain, seed=0, max_length=64, forget_caps=[1, 2, 3])
    b0 = collate(tok.eos_token_id)([plain[i] for i in range(3)])
    b1 = collate(tok.eos_token_id)([capped[i] for i in range(3)])
    assert "forget_cap" not in b0 and b1["forget_cap"].tolist() == [1.0, 2.0, 3.0]
    assert all(torch.equal(b0[k], b1[k]) for k in b0)
    with pytest.raises(ValueError, match="saturation levels"):
        ForgetRetainData(tok, split.forget[:3], [], seed=0, max_length=64, forget_caps=[1.0])


def test_levels_are_the_original_models_holdout_nlls(gpt2, split):
    model, tok = gpt2
    nll = score_items(model, tok, split.holdout, generate=False).nll
    by_rel: dict[str, list[float]] = {}
    for it, x in zip(split.holdout, nll):
        by_rel.setdefault(it.relation, []).append(x)
    assert saturation_levels(model, tok, split, make_config("npo")) is None
    for q in (0.0, 0.5, 1.0):
        lv = saturation_levels(model, tok, split, make_config("npo", {"saturation": "holdout",
                                                                      "saturation_quantile": q}))
        want = {r: (min(v) if q == 0 else max(v) if q == 1 else sum(v) / 2) for r, v in by_rel.items()}
        assert all(len(v) == 2 for v in by_rel.values())  # forget01: 2 persons, so the median is the midpoint
        assert lv == pytest.approx([want[it.relation] for it in split.forget], rel=1e-9)
    pair = saturation_levels(model, tok, split, make_config("npo", {"saturation": "holdout_pair"}))
    for r, v in by_rel.items():
        got = [x for it, x in zip(split.forget, pair) if it.relation == r]
        assert sorted(got) == pytest.approx(sorted(v), rel=1e-9)  # a permutation of that relation's holdout NLLs
    other = saturation_levels(model, tok, split, make_config("npo", {"saturation": "holdout_pair", "seed": 1}))
    assert sorted(other) == pytest.approx(sorted(pair)) and other != pair
    with pytest.raises(ValueError, match="unknown saturation"):
        saturation_levels(model, tok, split, make_config("npo", {"saturation": "retain"}))
    with pytest.raises(ValueError, match="holdout"):
        saturation_levels(model, tok, type(split)("x", split.forget, split.retain), make_config(
            "npo", {"saturation": "holdout"}))


def _deltas(res):
    return {u.param: u.delta.clone() for u in res.delta.updates}


@pytest.mark.parametrize("method", ["npo", "simnpo"])
def test_levels_that_never_bind_equal_the_plain_run_and_always_binding_drops_the_forget_term(
        gpt2, split, monkeypatch, method):
    model, tok = gpt2
    cfg = {"max_steps": 2, "lr": 1e-3, "batch_size": 4}
    plain = _deltas(unlearn(model, tok, split, method, cfg))
    n = len(split.forget)
    monkeypatch.setattr(run_mod, "saturation_levels", lambda *a: [math.inf] * n)
    never = _deltas(unlearn(model, tok, split, method, {**cfg, "saturation": "holdout"}))
    assert plain.keys() == never.keys() and all(torch.equal(plain[k], never[k]) for k in plain)
    monkeypatch.setattr(run_mod, "saturation_levels", lambda *a: [0.0] * n)  # every NLL is ≥ 0: all saturated
    always = _deltas(unlearn(model, tok, split, method, {**cfg, "saturation": "holdout"}))
    retain_only = _deltas(unlearn(model, tok, split, method, {**cfg, "forget_weight": 0.0}))
    assert always.keys() == retain_only.keys() and all(torch.equal(always[k], retain_only[k]) for k in always)
    assert any(not torch.equal(always[k], plain[k]) for k in plain)


def test_kl_retain_term_is_zero_at_the_original_and_positive_away(gpt2, split):
    model, tok = gpt2
    data = ForgetRetainData(tok, split.forget[:4], split.retain, seed=0, max_length=64)
    batch = collate(tok.eos_token_id)([data[i] for i in range(4)])
    tr = UnlearnTrainer.__new__(UnlearnTrainer)  # only the retain-term helpers, no Trainer set-up
    tr.ucfg = make_config("npo", {"retain_loss": "kl"})
    tr.ref_model, tr.model = model, model
    with torch.no_grad():
        assert float(tr.retain_nll(model, batch)) == pytest.approx(0.0, abs=1e-6)
        other = type(model)(model.config)
        other.load_state_dict(model.state_dict())
        other.eval()
        other.transformer.h[0].mlp.c_fc.weight.add_(0.5)
        assert float(tr.retain_nll(other, batch)) > 1e-3
    tr.ucfg = make_config("npo")
    with torch.no_grad():
        nll = float(tr.retain_nll(model, batch))
    assert nll > 0  # the NLL term is not 0 at the original: the two terms differ


def test_kl_retain_runs_and_bad_combinations_are_refused(gpt2, split):
    model, tok = gpt2
    res = unlearn(model, tok, split, "simnpo", {"max_steps": 1, "lr": 1e-3, "batch_size": 4, "retain_loss": "kl"})
    assert res.delta.updates
    with pytest.raises(ValueError, match="unknown retain_loss"):
        unlearn(model, tok, split, "npo", {"max_steps": 1, "retain_loss": "mse"})
    with pytest.raises(ValueError, match="own retain term"):
        unlearn(model, tok, split, "rkld", {"max_steps": 1, "retain_loss": "kl"})
    with pytest.raises(ValueError, match="no per-item saturation"):
        unlearn(model, tok, split, "grad_diff", {"max_steps": 1, "saturation": "holdout"})


def test_retain_pairs_extends_the_fixed_pairing(gpt2, split):
    _, tok = gpt2
    one = ForgetRetainData(tok, split.forget, split.retain, seed=0, max_length=64)
    three = ForgetRetainData(tok, split.forget, split.retain, seed=0, max_length=64, retain_pairs=3)
    assert [p[0] for p in three.pairs[:4]] == [one.pairs[0][0], one.pairs[3][0], one.pairs[6][0], one.pairs[9][0]]
    flat = [j for p in three.pairs for j in p]
    assert flat[:12] == [p[0] for p in one.pairs]  # the plain pairing is the start of the same seeded order
    assert flat[24:] == flat[:12]  # 36 slots over 24 retain items: cycled
    assert len({j for p in three.pairs for j in p}) == len(split.retain)  # 36 slots cover all 24
    b = collate(tok.eos_token_id)([three[i] for i in range(4)])
    assert b["forget_input_ids"].shape[0] == 4 and b["retain_input_ids"].shape[0] == 12
    b1 = collate(tok.eos_token_id)([one[i] for i in range(4)])
    assert b1["retain_input_ids"].shape[0] == 4
    with pytest.raises(ValueError, match="retain_pairs"):
        ForgetRetainData(tok, split.forget, split.retain, seed=0, max_length=64, retain_pairs=0)
