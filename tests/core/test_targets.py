"""The batched target optimiser equals per-request optimisation, leaves the model bit-identical and respects the
clamp ‖δ‖ ≤ clamp·‖v_0‖ (MEMIT's block site and PMET's attention+MLP sites with the adaptive NLL weight); its
shortcuts (cached lower layers, head-only logits) give the plain computation's δ; the chunking minimises its cost
model; and the v* loss equals the ROME formula computed by hand."""

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


def _chunk_cost(chunks, overhead):
    return sum(overhead + len(c) * max(len(r.ids) for r in c) for c in chunks)


def test_length_buckets_minimise_the_cost_model_and_cover_rows_once():
    import itertools
    import random

    from kedit.core.targets import _length_buckets, _Row

    rng = random.Random(0)
    for trial in range(30):
        rows = [_Row(req=0, ids=[1] * rng.randint(2, 30), subj=0, kind="rewrite") for _ in range(rng.randint(1, 9))]
        overhead = rng.choice([0, 5, 40, 300])
        chunks = _length_buckets(rows, max_rows=64, overhead_tokens=overhead)
        assert sorted(id(r) for c in chunks for r in c) == sorted(id(r) for r in rows)
        # brute force: every contiguous partition of the rows sorted by length
        order = sorted(rows, key=lambda r: len(r.ids))
        best = min(
            _chunk_cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))], overhead)
            for k in range(len(order))
            for cuts in itertools.combinations(range(1, len(order)), k)
        )
        assert _chunk_cost(chunks, overhead) == pytest.approx(best), trial


def test_length_buckets_keep_a_single_request_together_and_bound_chunk_rows():
    import random

    from kedit.core.targets import _length_buckets, _Row

    rome = [_Row(0, [1] * n, 0, "rewrite") for n in (4, 12, 13, 13, 14, 15)] + [_Row(0, [1] * 3, 0, "kl")]
    assert len(_length_buckets(rome, max_rows=256)) == 1
    rng = random.Random(1)
    many = [_Row(i // 7, [1] * rng.randint(4, 40), 0, "rewrite") for i in range(3000)]
    chunks = _length_buckets(many, max_rows=64)
    assert sorted(id(r) for c in chunks for r in c) == sorted(id(r) for r in many)
    assert all(1 <= len(c) <= 64 for c in chunks)
    # a large batch is cut by length: far less padding than one sorted run of 64-row chunks
    padded = sum(len(c) * max(len(r.ids) for r in c) for c in chunks)
    real = sum(len(r.ids) for r in many)
    assert padded <= 1.1 * real


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


PLAIN = {"reuse_lower_layers": False, "head_only_logits": False, "reuse_prefix": False}


def _both_ways(model, tok, reqs, sites, templates, caplog, **cfg_kw):
    adapter = get_adapter(model)
    cfg = dict(lr=0.5, steps=6, weight_decay=0.3, early_stop_loss=-1.0, **cfg_kw)
    with caplog.at_level("WARNING", logger="kedit.core.targets"):
        fast = optimize_targets(model, tok, adapter, reqs, sites, TargetConfig(**cfg), templates)
    assert not [r for r in caplog.records if "fall" in r.getMessage()], "the shortcut must not fall back here"
    plain = optimize_targets(model, tok, adapter, reqs, sites, TargetConfig(**cfg, **PLAIN), templates)
    assert fast.history == pytest.approx(plain.history, rel=1e-5, abs=1e-6)
    for s in sites:
        # relative to ‖δ‖: Adam divides by √v, so a component whose gradient is ~0 carries float noise at full
        # step size (re-chunking the plain computation alone moves single components of δ by ~1e-4 on
        # testbed-llama, ‖Δδ‖/‖δ‖ ~ 5e-6)
        assert float(plain.delta[s].norm()) > 0
        assert float((fast.delta[s] - plain.delta[s]).norm() / plain.delta[s].norm()) <= 1e-5, s
    return fast, plain


@pytest.mark.parametrize(
    "arch,sites",
    [
        ("gpt2", [Site("mlp_out", 1)]),  # ROME: blocks 0-1 replayed
        ("llama", [Site("mlp_out", 0)]),  # ROME on Llama's first layer: block 0 replayed, rotary from the model
        ("gpt2", [Site("block", 3)]),  # MEMIT's last block of 4: every block replayed
        ("llama", [Site("attn_out", 2), Site("mlp_out", 2)]),  # PMET: block 2 runs (its MLP sees the attention δ)
    ],
)
def test_shortcuts_give_the_plain_computations_delta(arch, sites, tok, caplog):
    # initializer_range 0.2 gives logits of a trained model's scale; at the default 0.02 the gradients are so
    # small that Adam's g/√v turns float noise into full steps (re-batching the plain computation alone then
    # moves δ by ~3e-5 relative)
    model = tiny_model(arch, vocab_size=len(tok), initializer_range=0.2)
    _both_ways(model, tok, REQS, sites, TEMPLATES, caplog)


@pytest.mark.parametrize("arch,layer", [("gpt2", 1), ("llama", 0)])
def test_shortcuts_on_the_testbed_models(arch, layer, caplog):
    from kedit.testbed import edit_requests, load_testbed_model

    model, ttok = load_testbed_model(arch)
    reqs = edit_requests(n=2)
    templates = ["{}", "The city of the north. {}", "I think that. {}"]
    _both_ways(model, ttok, reqs, [Site("mlp_out", layer)], templates, caplog, clamp_norm_factor=20.0)


def test_a_soft_capped_head_falls_back_to_the_full_forward(tok, caplog):
    """An architecture whose logits are not ``unembed(final_norm(h))`` (here: a scale applied to the model's full
    logits, as Cohere's ``logit_scale`` or Gemma-2's final soft-cap are) is caught by the check before the first
    step, and the optimiser still returns the plain computation's δ."""
    model = tiny_model("gpt2", vocab_size=len(tok))
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, a, out: 4.0 * out if out.dim() == 3 else out)
    try:
        adapter = get_adapter(model)
        cfg = dict(lr=0.5, steps=4, early_stop_loss=-1.0)
        sites = [Site("mlp_out", 1)]
        with caplog.at_level("WARNING", logger="kedit.core.targets"):
            fast = optimize_targets(model, tok, adapter, REQS, sites, TargetConfig(**cfg), TEMPLATES)
        assert any("fall" in r.getMessage() for r in caplog.records)
        plain = optimize_targets(model, tok, adapter, REQS, sites, TargetConfig(**cfg, **PLAIN), TEMPLATES)
        assert torch.allclose(fast.delta[sites[0]], plain.delta[sites[0]], atol=1e-6)
    finally:
        handle.remove()


def _hand_v_loss(model, tok, adapter, req, layer, templates, delta, kl_factor, weight_decay):
    """The ROME v* loss written out from the paper (Meng et al. 2022, eq. 4) and its code's normalisation:
    mean over templates of the per-token-averaged NLL of the target, + kl_factor · KL(P_δ ‖ P_0) of the next
    token at the subject's last token of "{subject} is a", + weight_decay · ‖δ‖ / ‖v_0‖², δ added to the MLP
    output at the subject's last token. Tokenisation by hand: the subject's last token is the last token of the
    text up to the subject's end (byte-level BPE splits at the blank that follows)."""
    import torch.nn.functional as F

    module = adapter.module(model, "mlp_out", layer)
    tgt = tok(" " + req.target_new, add_special_tokens=False)["input_ids"]

    def run(text_before, subject, text_after, extra, d):
        head_ids = tok(text_before + subject)["input_ids"]
        ids = tok(text_before + subject + text_after)["input_ids"] + extra
        pos = len(head_ids) - 1
        seen = {}

        def hook(m, a, out):
            seen["v"] = out[0, pos].detach().clone()
            return out + torch.zeros_like(out).index_put((torch.tensor([0]), torch.tensor([pos])), d[None])

        h = module.register_forward_hook(hook)
        try:
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        finally:
            h.remove()
        return logits, ids, pos, seen["v"]

    zero = torch.zeros_like(delta)
    before, after = req.prompt.split("{}")
    nlls = []
    for t in templates:
        ctx = t.replace("{}", "")
        logits, ids, _, _ = run(ctx + before, req.subject, after, tgt[:-1], delta)
        start = len(ids) - len(tgt)  # logits at `start + j` predict target token j
        logp = F.log_softmax(logits, -1)
        nlls.append(-sum(logp[start + j, tok_id] for j, tok_id in enumerate(tgt)) / len(tgt))
    nll = sum(nlls) / len(nlls)
    _, _, _, v0 = run(before, req.subject, after, [], zero)
    lp_edit, _, pos, _ = run("", req.subject, " is a", [], delta)
    lp_orig, _, _, _ = run("", req.subject, " is a", [], zero)
    p_edit, p_orig = F.log_softmax(lp_edit[pos], -1), F.log_softmax(lp_orig[pos], -1)
    kl = (p_edit.exp() * (p_edit - p_orig.detach())).sum()
    wd = delta.norm() / v0.norm() ** 2
    return nll + kl_factor * kl + weight_decay * wd, nll, kl, wd


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_v_loss_equals_the_hand_computed_rome_loss(arch, tok):
    """Step 0 (δ = 0: the NLL alone) and step 1 (δ after one Adam step, every term non-zero) against the formula
    computed by hand; the first Adam step is lr · g / (|g| + eps) with g the gradient of the hand-computed loss."""
    model = tiny_model(arch, vocab_size=len(tok))
    adapter = get_adapter(model)
    layer, lr, kl_factor, wd = 1, 0.5, 0.7, 1e-5  # ‖v_0‖ ≈ 0.01 on a random model: keep the terms comparable
    templates = ["{}", "Paris is a city. {}", "Berlin is in Germany. {}"]
    cfg = TargetConfig(lr=lr, steps=2, weight_decay=wd, kl_factor=kl_factor, early_stop_loss=-1.0,
                       clamp_norm_factor=1e6)
    site = Site("mlp_out", layer)
    reqs = REQS[:2]
    res = optimize_targets(model, tok, adapter, reqs, [site], cfg, templates)
    assert len(res.history) == 2
    loss0s = []
    for i, req in enumerate(reqs):
        d0 = torch.zeros_like(res.delta[site][i], requires_grad=True)
        loss0, nll0, kl0, wd0 = _hand_v_loss(model, tok, adapter, req, layer, templates, d0, kl_factor, wd)
        assert float((kl0).detach()) == pytest.approx(0.0, abs=1e-6) and float((wd0).detach()) == 0.0
        loss0s.append(float((loss0).detach()))
        g = torch.autograd.grad(nll0 + kl_factor * kl0, d0)[0]  # ‖δ‖'s gradient at 0 is taken as 0
        d1 = res.delta[site][i]
        strong = g.abs() > 1e-5
        assert strong.float().mean() > 0.5
        assert torch.allclose(d1[strong], (-lr * g / (g.abs() + 1e-8))[strong], rtol=1e-4, atol=1e-5)
        loss1, nll1, kl1, wd1 = _hand_v_loss(model, tok, adapter, req, layer, templates, d1, kl_factor, wd)
        assert float((kl1).detach()) > 1e-3 and float((wd * wd1).detach()) > 1e-3 and abs(float((nll1 - nll0).detach())) > 1e-3
        assert float(res.loss[i]) == pytest.approx(float((loss1).detach()), rel=1e-5, abs=1e-6)
        assert float(res.nll[i]) == pytest.approx(float((nll1).detach()), rel=1e-5, abs=1e-6)
    # the reported history is the mean over the active requests
    assert res.history[0] == pytest.approx(sum(loss0s) / len(loss0s), rel=1e-5)
    assert res.history[1] == pytest.approx(float(res.loss.mean()), rel=1e-6)
