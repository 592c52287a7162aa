"""ROME invariants (Meng et al. 2022) on tiny random models: no mutation in compute, the edited layer maps the
plain-prompt key to v*, rank one, C⁻¹-orthogonal keys unaffected, exact rollback, r-ROME key modes."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kedit.arch import get_adapter, math_weight
from kedit.core.context import EditContext
from kedit.core.keys import compute_keys
from kedit.core.solve import SingularSystemError
from kedit.core.targets import Site, TargetConfig, optimize_targets, prompt_text
from kedit.methods.registry import get_method
from kedit.requests import EditRequest
from kedit.testing import TINY_TEXT, tiny_model, tiny_tokenizer

TEMPLATES = ["{}", "Paris is a city. {}", "Because of that. {}"]
CORPUS = [s.strip() + "." for s in TINY_TEXT.split(".") if s.strip()] * 6
REQ = EditRequest("{} plays the", "Toko Yasuda", "trumpet", target_true="guitar")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _ctx():
    return EditContext(corpus=CORPUS, corpus_id="tiny", templates=TEMPLATES)


def _cfg(spec, **kw):
    base = dict(layer=1, v_steps=8, mom2_n_tokens=600)
    base.update(kw)
    return spec.make_config(base)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("mom2", [True, False])
def test_rome_invariants(arch, mom2, tok):
    model = tiny_model(arch, vocab_size=len(tok))
    spec = get_method("rome")
    cfg = _cfg(spec, mom2_adjustment=mom2)
    ctx = _ctx()
    before = _state(model)
    delta = spec.compute(model, tok, [REQ], cfg, ctx)
    # compute never mutates the model
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    (update,) = delta.updates
    assert update.rank == 1
    assert torch.linalg.matrix_rank(update.dense().double(), rtol=1e-5).item() == 1

    adapter = get_adapter(model)
    module = adapter.module(model, "mlp_out", 1)
    # independent v*: the optimiser is deterministic given the templates
    tcfg = TargetConfig(lr=cfg.v_lr, steps=cfg.v_steps, weight_decay=cfg.v_weight_decay,
                        clamp_norm_factor=cfg.clamp_norm_factor, kl_factor=cfg.kl_factor)
    site = Site("mlp_out", 1)
    res = optimize_targets(model, tok, adapter, [REQ], [site], tcfg, TEMPLATES)
    v_star = res.target(site)[0]
    texts, spans = zip(*(prompt_text(t, REQ) for t in TEMPLATES))
    keys = compute_keys(model, tok, adapter, [1], list(texts), list(spans))[1]
    k_e = keys[0]
    w0 = math_weight(module).detach().clone()

    delta.apply(model)
    _, outs = compute_keys(model, tok, adapter, [1], [texts[0]], [spans[0]], with_outputs=True)
    assert torch.allclose(outs[1][0], v_star, atol=1e-4, rtol=1e-4), "edited layer must map k_e to v*"
    assert res.delta[site].norm() > 0

    # keys with k^T C^-1 k* = 0 are unaffected
    if mom2:
        Cm = ctx.second_moments(model, tok, [1], n_tokens=cfg.mom2_n_tokens)[1].mean.double()
        ck = torch.linalg.solve(Cm, keys.mean(0).double())
    else:
        ck = keys.mean(0).double()
    g = torch.Generator().manual_seed(0)
    k = torch.randn(k_e.shape[0], generator=g, dtype=torch.float64)
    k = k - (k @ ck) / (ck @ ck) * ck
    w1 = math_weight(module).detach().double()
    assert torch.allclose(w1 @ k, w0.double() @ k, atol=1e-5)
    assert not torch.allclose(w1, w0.double())

    delta.revert(model)
    assert all(torch.equal(before[k_], v) for k_, v in model.state_dict().items())


def test_r_rome_modes_differ(tok):
    model = tiny_model("gpt2", vocab_size=len(tok))
    spec = get_method("rome")
    d_rome = spec.compute(model, tok, [REQ], _cfg(spec, key_mode="rome"), _ctx())
    rr = get_method("r-rome")
    cfg = _cfg(rr, key_mode="prompt")
    d_r = rr.compute(model, tok, [REQ], cfg, _ctx())
    assert d_r.method == "r-rome" and d_rome.method == "rome"
    assert not torch.allclose(d_rome.updates[0].dense(), d_r.updates[0].dense())
    # r-ROME (prompt keys): u ∝ C⁻¹k_e, so the edit maps k_e exactly with u from the same key
    with pytest.raises(ValueError, match="key_mode"):
        spec.compute(model, tok, [REQ], _cfg(spec, key_mode="bogus"), _ctx())


def test_rome_multiple_requests_rank_n_and_layer_errors(tok):
    model = tiny_model("llama", vocab_size=len(tok))
    spec = get_method("rome")
    reqs = [REQ, EditRequest("The capital of {} is", "France", "Berlin")]
    delta = spec.compute(model, tok, reqs, _cfg(spec, mom2_adjustment=False), _ctx())
    assert delta.updates[0].rank == 2
    with pytest.raises(ValueError, match="out of range"):
        spec.compute(model, tok, reqs, _cfg(spec, layer=99), _ctx())


def test_rome_singular_statistics_named(tok):
    model = tiny_model("gpt2", vocab_size=len(tok))
    spec = get_method("rome")
    ctx = EditContext(corpus=["Paris."], corpus_id="one-text", templates=TEMPLATES)  # rank-deficient C
    with pytest.raises(SingularSystemError, match="layer 1"):
        spec.compute(model, tok, [REQ], _cfg(spec, mom2_n_tokens=2), ctx)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_r_rome_averaged_maps_mean_key_to_v_star(arch, tok):
    """r-ROME random-prefix keys (Gupta et al. 2024): u ∝ C⁻¹k̄ and the edited layer maps the mean key k̄ over the
    context templates to v* = v_e + δ, checked by hand from the layer's weights (and bias)."""
    model = tiny_model(arch, vocab_size=len(tok))
    spec = get_method("r-rome")
    cfg = _cfg(spec, key_mode="averaged")
    ctx = _ctx()
    delta = spec.compute(model, tok, [REQ], cfg, ctx)
    adapter = get_adapter(model)
    module = adapter.module(model, "mlp_out", 1)
    tcfg = TargetConfig(lr=cfg.v_lr, steps=cfg.v_steps, weight_decay=cfg.v_weight_decay,
                        clamp_norm_factor=cfg.clamp_norm_factor, kl_factor=cfg.kl_factor)
    site = Site("mlp_out", 1)
    res = optimize_targets(model, tok, adapter, [REQ], [site], tcfg, TEMPLATES)
    v_star = res.target(site)[0].double()
    texts, spans = zip(*(prompt_text(t, REQ) for t in TEMPLATES))
    keys = compute_keys(model, tok, adapter, [1], list(texts), list(spans))[1].double()
    k_bar, k_e = keys.mean(0), keys[0]
    bias = getattr(module, "bias", None)
    b = torch.zeros_like(v_star) if bias is None else bias.detach().double()
    w0 = math_weight(module).detach().double().clone()
    # the old solve ((W+Δ)k̄ = Wk̄ + δ) would miss v* by W(k_e − k̄): make sure the test can tell them apart
    assert (w0 @ (k_e - k_bar)).norm() > 1e-2 * v_star.norm()

    C = ctx.second_moments(model, tok, [1], n_tokens=cfg.mom2_n_tokens)[1].mean.double()
    (update,) = delta.updates
    dense = update.dense(dtype=torch.float64)
    dense = dense.T if dense.shape != w0.shape else dense
    u = torch.linalg.svd(dense)[2][0]
    u_ref = torch.linalg.solve(C, k_bar)
    assert abs(torch.nn.functional.cosine_similarity(u, u_ref, dim=0)) > 1 - 1e-6

    delta.apply(model)
    w1 = math_weight(module).detach().double()
    assert torch.allclose(w1 @ k_bar + b, v_star, atol=1e-4, rtol=1e-4), "edited layer must map k̄ to v*"
    assert not torch.allclose(w1 @ k_bar + b, w0 @ k_bar + b + res.delta[site][0].double(), atol=1e-4, rtol=1e-4)
    delta.revert(model)
