"""AlphaEdit invariants (Fang et al., ICLR 2025) on tiny gpt2/llama models: Δ(I−P) = 0 with the projector cached in
``ctx.state["alphaedit"]``, preserved keys are (nearly) annihilated, the projected normal equations hold, the key
cache grows by K Kᵀ (keys recomputed on the edited model) after a batch and enters the next batch's solve."""

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
    snapshot,
    stages,
    tok,
    unchanged,
)

from kedit.arch import get_adapter
from kedit.core.keys import compute_keys
from kedit.core.walk import request_keys
from kedit.methods.alphaedit import alphaedit_state
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
    assert state["batches"] == 1
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
    # the key cache grew by K Kᵀ with keys recomputed on the edited model
    delta.apply(m)
    try:
        K_edit = request_keys(m, tok(), get_adapter(m), LAYERS, REQS, TEMPLATES)
    finally:
        delta.revert(m)
    for l in LAYERS:
        Kl = K_edit[l].double()
        assert torch.allclose(state["key_cache"][(mk, l)], Kl.T @ Kl, atol=1e-5)
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
        kp = {l: state["key_cache"][(c.model_key(m), l)].clone() for l in (1, 2)}
        second = spec.compute(m, tok(), REQS[1:], cfg, c)
    finally:
        first.revert(m)
    assert state["batches"] == 2 and second.meta["alphaedit"]["previous_batches"] == 1
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
    assert alphaedit_state(c)["batches"] == 0 and not alphaedit_state(c)["key_cache"]
