"""EditContext is bound to one model: edited states and identical reloads reuse its statistics, any other model of
the same shape is refused (before, it silently reused the first model's covariance and null-space basis)."""

from __future__ import annotations

import copy
import dataclasses
import gc
import weakref

import pytest
import torch

from kedit.core.context import ContextModelMismatchError, EditContext, pristine_fingerprint
from kedit.fingerprint import model_fingerprint
from kedit.methods.registry import get_method
from kedit.requests import EditRequest
from kedit.testing import TINY_TEXT, tiny_model, tiny_tokenizer

CORPUS = [s.strip() + "." for s in TINY_TEXT.split(".") if s.strip()] * 4
TEMPLATES = ["{}", "Paris is a city. {}"]
REQ = EditRequest("{} plays the", "Toko Yasuda", "trumpet")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _ctx() -> EditContext:
    return EditContext(corpus=CORPUS, corpus_id="tiny", templates=TEMPLATES)


def _c(ctx, model, tok, layer=1):
    return ctx.second_moments(model, tok, [layer], n_tokens=300)[layer].mean


def test_other_model_of_same_shape_is_refused(tok):
    a = tiny_model("gpt2", vocab_size=len(tok), seed=0)
    b = tiny_model("gpt2", vocab_size=len(tok), seed=1)
    ctx = _ctx()
    c_a = _c(ctx, a, tok)
    with pytest.raises(ContextModelMismatchError, match="new EditContext.*rebind"):
        _c(ctx, b, tok)
    sampled = EditContext()  # sampled templates are the model's too
    sampled.context_templates(a, tok, [(3, 1)])
    with pytest.raises(ContextModelMismatchError):
        sampled.context_templates(b, tok, [(3, 1)])
    # what the old code would have handed out: a's covariance for b
    assert not torch.allclose(c_a, _c(_ctx(), b, tok))


def test_shared_stats_cache_keeps_models_apart(tok):
    """Two contexts sharing one StatsCache: each model gets its own covariance."""
    a = tiny_model("gpt2", vocab_size=len(tok), seed=0)
    b = tiny_model("gpt2", vocab_size=len(tok), seed=1)
    ctx_a = _ctx()
    ctx_b = EditContext(stats=ctx_a.stats, corpus=CORPUS, corpus_id="tiny")
    c_a, c_b = _c(ctx_a, a, tok), _c(ctx_b, b, tok)
    assert torch.equal(c_b, _c(_ctx(), b, tok))
    assert not torch.allclose(c_a, c_b)


def test_rebind(tok):
    a = tiny_model("gpt2", vocab_size=len(tok), seed=0)
    b = tiny_model("gpt2", vocab_size=len(tok), seed=1)
    ctx = _ctx()
    _c(ctx, a, tok)
    ctx.state["x"] = 1
    ctx.rebind(b)
    assert ctx.state == {}
    assert ctx.bound_key == model_fingerprint(b)
    assert torch.equal(_c(ctx, b, tok), _c(_ctx(), b, tok))
    with pytest.raises(ContextModelMismatchError):
        _c(ctx, a, tok)


def test_edited_same_object_reuses_base_statistics(tok):
    m = tiny_model("gpt2", vocab_size=len(tok))
    spec = get_method("rome")
    cfg = spec.make_config(dict(layer=1, v_steps=3, mom2_n_tokens=300))
    ctx = _ctx()
    key = ctx.model_key(m)
    c0 = _c(ctx, m, tok)
    delta = spec.compute(m, tok, [REQ], cfg, ctx)
    delta.apply(m)
    assert model_fingerprint(m) != key  # the weights did change
    assert ctx.model_key(m) == key
    assert _c(ctx, m, tok) is c0 or torch.equal(_c(ctx, m, tok), c0)
    # edited by hand (no ledger) -- still the same object, still accepted
    with torch.no_grad():
        next(m.parameters()).add_(1.0)
    assert ctx.model_key(m) == key
    with torch.no_grad():
        next(m.parameters()).sub_(1.0)
    delta.revert(m)


def test_identical_reload_accepted_and_no_strong_ref(tok):
    a = tiny_model("gpt2", vocab_size=len(tok), seed=0)
    ctx = _ctx()
    key = ctx.model_key(a)
    ref = weakref.ref(a)
    del a
    gc.collect()
    assert ref() is None  # the context does not keep the model alive
    again = tiny_model("gpt2", vocab_size=len(tok), seed=0)  # "reloaded": same weights, new object
    assert ctx.model_key(again) == key
    # a deep copy (empty ledger, same weights) too
    assert ctx.model_key(copy.deepcopy(again)) == key


def test_reload_with_applied_deltas_accepted_by_pristine_weights(tok):
    a = tiny_model("gpt2", vocab_size=len(tok), seed=0)
    ctx = _ctx()
    key = ctx.model_key(a)
    other = tiny_model("gpt2", vocab_size=len(tok), seed=0)
    spec = get_method("rome")
    delta = spec.compute(other, tok, [REQ], spec.make_config(dict(layer=1, v_steps=3, mom2_adjustment=False)),
                         _ctx())
    delta.apply(other)
    assert model_fingerprint(other) != key
    assert pristine_fingerprint(other) == key
    assert ctx.model_key(other) == key
    delta.revert(other)
    assert pristine_fingerprint(other) is None


def test_edited_copy_without_ledger_is_refused(tok):
    """A deep copy of an edited model carries no ledger: nothing proves it derives from the bound weights."""
    a = tiny_model("gpt2", vocab_size=len(tok), seed=0)
    ctx = _ctx()
    ctx.model_key(a)
    spec = get_method("rome")
    delta = spec.compute(a, tok, [REQ], spec.make_config(dict(layer=1, v_steps=3, mom2_adjustment=False)), ctx)
    delta.apply(a)
    with pytest.raises(ContextModelMismatchError):
        ctx.model_key(copy.deepcopy(a))
    delta.revert(a)


def test_replace_shares_binding(tok):
    a = tiny_model("gpt2", vocab_size=len(tok), seed=0)
    b = tiny_model("gpt2", vocab_size=len(tok), seed=1)
    base = _ctx()
    step = dataclasses.replace(base, state={})
    step.model_key(a)  # bound through the copy, as the eval runner's per-step contexts are
    assert base.bound_key == model_fingerprint(a)
    with pytest.raises(ContextModelMismatchError):
        dataclasses.replace(base, state={}).model_key(b)


def test_alphaedit_refuses_other_model(tok):
    """The reported bug: AlphaEdit's cached null-space basis of model a applied to model b."""
    a = tiny_model("gpt2", vocab_size=len(tok), seed=0)
    b = tiny_model("gpt2", vocab_size=len(tok), seed=1)
    spec = get_method("alphaedit")
    cfg = spec.make_config(dict(layers=(1,), v_steps=2, mom2_n_tokens=300))
    ctx = _ctx()
    spec.compute(a, tok, [REQ], cfg, ctx)
    with pytest.raises(ContextModelMismatchError):
        spec.compute(b, tok, [REQ], cfg, ctx)
