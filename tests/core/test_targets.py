"""The batched target optimiser equals per-request optimisation, leaves the model bit-identical and respects the
clamp ‖δ‖ ≤ clamp·‖v_0‖ (MEMIT's block site and PMET's attention+MLP sites with the adaptive NLL weight)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from kedit.arch import get_adapter
from kedit.core.targets import Site, TargetConfig, optimize_targets
from kedit.requests import EditRequest
from kedit.testing import tiny_model, tiny_tokenizer

TEMPLATES = ["{}", "Paris is a city. {}"]
REQS = [
    EditRequest("{} plays the", "Toko Yasuda", "trumpet"),
    EditRequest("The capital of {} is", "France", "Berlin"),
    EditRequest("{} was a French", "Danielle Darrieux", "engineer"),
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize(
    "arch,sites,adaptive",
    [
        ("gpt2", [Site("block", 2)], False),
        ("llama", [Site("attn_out", 2), Site("mlp_out", 2)], True),
    ],
)
def test_batched_equals_per_request(arch, sites, adaptive, tok):
    model = tiny_model(arch, vocab_size=len(tok))
    adapter = get_adapter(model)
    # a small clamp so that the projection is active for some requests
    cfg = TargetConfig(lr=0.5, steps=6, clamp_norm_factor=0.3, adaptive_nll=adaptive, weight_decay=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batched = optimize_targets(model, tok, adapter, REQS, sites, cfg, TEMPLATES)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    for i, req in enumerate(REQS):
        single = optimize_targets(model, tok, adapter, [req], sites, cfg, TEMPLATES)
        assert int(single.steps[0]) == int(batched.steps[i])
        for s in sites:
            assert torch.allclose(single.init[s][0], batched.init[s][i], atol=1e-5)
            assert torch.allclose(single.delta[s][0], batched.delta[s][i], atol=1e-4, rtol=1e-3), (req, s)
        assert torch.allclose(single.loss[0], batched.loss[i], atol=1e-4, rtol=1e-3)
    clamped = False
    for s in sites:
        norms = batched.delta[s].norm(dim=-1)
        limit = cfg.clamp_norm_factor * batched.init[s].norm(dim=-1)
        assert (norms <= limit * (1 + 1e-5)).all()
        clamped |= bool(torch.isclose(norms, limit, rtol=1e-4).any())
        assert (norms > 0).all()
    assert clamped, "the clamp should be active for at least one request in this setting"


def test_length_buckets_cover_rows_once_and_bound_padding():
    import random

    from kedit.core.targets import _length_buckets, _Row

    rng = random.Random(0)
    rows = [_Row(req=i // 7, ids=[1] * rng.randint(4, 40), subj=0, kind="rewrite") for i in range(300)]
    chunks = _length_buckets(rows, max_rows=64)
    assert sorted(id(r) for c in chunks for r in c) == sorted(id(r) for r in rows)
    for c in chunks:
        assert 1 <= len(c) <= 64
        longest = max(len(r.ids) for r in c)
        real = sum(len(r.ids) for r in c)
        assert len(c) == 1 or longest * len(c) <= 1.15 * real + 1e-9


def test_clamp_by_slot_bounds_each_site_separately(tok):
    model = tiny_model("llama", vocab_size=len(tok))
    adapter = get_adapter(model)
    sites = [Site("attn_out", 2), Site("mlp_out", 2)]
    cfg = TargetConfig(lr=0.5, steps=6, clamp_norm_factor=0.3, clamp_by_slot={"attn_out": 0.05}, weight_decay=0.0)
    res = optimize_targets(model, tok, adapter, REQS, sites, cfg, TEMPLATES)
    attn = res.delta[sites[0]].norm(dim=-1) / res.init[sites[0]].norm(dim=-1)
    mlp = res.delta[sites[1]].norm(dim=-1) / res.init[sites[1]].norm(dim=-1)
    assert (attn <= 0.05 * (1 + 1e-5)).all() and (mlp <= 0.3 * (1 + 1e-5)).all()
    assert bool((mlp > 0.06).any()), "the MLP δ keeps its own, larger bound"
    frozen = optimize_targets(
        model, tok, adapter, REQS, sites, TargetConfig(lr=0.5, steps=4, clamp_by_slot={"attn_out": 0.0}), TEMPLATES
    )
    assert torch.count_nonzero(frozen.delta[sites[0]]) == 0
    assert torch.count_nonzero(frozen.delta[sites[1]]) > 0


@pytest.mark.parametrize("kw", [{"clamp_norm_factor": -1.0}, {"clamp_by_slot": {"attn_out": -0.5}},
                                {"clamp_by_slot": {"mlp_out": float("nan")}}])
def test_negative_or_nan_clamp_is_refused(kw):
    with pytest.raises(ValueError, match="must be >= 0"):
        TargetConfig(**kw)
