"""Recursive least-squares editing (``rls``): after earlier RLS edits, the Woodbury-updated solve equals the batch
solve ``Δ = R Kᵀ(λC + εI + Σ K_sK_sᵀ + KKᵀ)⁻¹`` on the same keys (recomputed independently in NumPy); the stored keys
are the edited model's; the running inverse is rolled back with the weights (bitwise), a memo extended edit by edit
equals the fold from scratch, and a new edit costs one Woodbury step per layer however many edits came before."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
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
from kedit.core.walk import request_keys
from kedit.methods.registry import get_method
from kedit.methods.rls import KEYS_EXTRA, rls_state, running_inverse
from kedit.requests import EditRequest

STREAM = [*REQS, EditRequest("{} was born in", "Danielle Darrieux", "Tokyo", case_id="c")]


def _p0(c):
    return {l: P for (_, l, *_), P in rls_state(c)["p0"].items()}


def _numpy_batch_delta(K, R, C, lam, ridge, K_prev):
    """Δ = R Kᵀ (λC + εI + K_pK_pᵀ + KKᵀ)⁻¹ in NumPy float64, ε = ridge·tr(λC)/d_k -- no Woodbury, no kedit."""
    Kn, Rn, Cn = (t.double().numpy() for t in (K, R, C))
    A = lam * 0.5 * (Cn + Cn.T)
    A = A + ridge * np.trace(A) / A.shape[0] * np.eye(A.shape[0])
    for Kp in K_prev:
        Kp = Kp.double().numpy()
        A = A + Kp @ Kp.T
    return torch.from_numpy(Rn @ Kn.T @ np.linalg.inv(A + Kn @ Kn.T))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rls_equals_the_batch_solve_on_the_same_keys(arch):
    m = model(arch)
    spec = get_method("rls")
    cfg = config("rls", ridge=1e-3)
    c = ctx()
    base = snapshot(m)
    applied = []
    try:
        for r in STREAM[:-1]:
            d = spec.compute(m, tok(), [r], cfg, c)
            applied.append(d.apply(m))
            # the stored keys are those of the model just edited (a layer's keys do not depend on its own layer)
            now = request_keys(m, tok(), get_adapter(m), LAYERS, [r], TEMPLATES)
            for l in LAYERS:
                assert torch.allclose(d.extras[f"{KEYS_EXTRA}{l}"], now[l], atol=1e-6)
        before = snapshot(m)
        last = spec.compute(m, tok(), STREAM[-1:], cfg, c)
        assert unchanged(m, before)
        assert last.meta["rls"]["previous_batches"] == len(applied)
        for st in stages(last):
            layer = st["layer"]
            K_prev = [d.extras[f"{KEYS_EXTRA}{layer}"].T for d in applied]
            want = _numpy_batch_delta(
                st["K"], st["R"], second_moment(m, c, layer), cfg.mom2_update_weight, cfg.ridge, K_prev
            )
            assert_close_rel(math_delta(m, last, layer), want, rtol=1e-6)
    finally:
        for d in reversed(applied):
            d.revert(m)
    assert unchanged(m, base)


def test_rls_running_inverse_is_rolled_back_and_cost_stays_flat():
    m = model("gpt2")
    spec = get_method("rls")
    cfg = config("rls")
    c = ctx()
    base = snapshot(m)
    deltas, inverses, steps = [], [], []
    try:
        for r in STREAM:
            d = spec.compute(m, tok(), [r], cfg, c)
            assert d.meta["rls"]["woodbury_steps"] == 0  # the memo already holds every applied delta
            deltas.append(d.apply(m))
            P, n, k = running_inverse(m, c, LAYERS, _p0(c))
            steps.append(k)
            inverses.append({l: P[l].clone() for l in LAYERS})
            assert n == len(deltas)
        # per edit: one Woodbury step per layer for the one delta applied since the last call, never more
        assert steps == [len(LAYERS)] * len(STREAM)
        # the memo extended edit by edit is bitwise the fold from scratch
        rls_state(c)["running"].clear()
        scratch, _, n_steps = running_inverse(m, c, LAYERS, _p0(c))
        assert n_steps == len(LAYERS) * len(STREAM)
        assert all(torch.equal(scratch[l], inverses[-1][l]) for l in LAYERS)
        # revert the newest: the running inverse is the one after the previous edit, bitwise
        deltas.pop().revert(m)
        P, n, _ = running_inverse(m, c, LAYERS, _p0(c))
        assert n == len(deltas) and all(torch.equal(P[l], inverses[-2][l]) for l in LAYERS)
    finally:
        for d in reversed(deltas):
            d.revert(m)
    assert unchanged(m, base)
    P, n, _ = running_inverse(m, c, LAYERS, _p0(c))
    assert n == 0 and all(torch.equal(P[l], _p0(c)[l]) for l in LAYERS) and not rls_state(c)["running"]
    # a delta never applied leaves nothing behind; apply -> revert is bitwise
    fresh = spec.compute(m, tok(), STREAM[:1], cfg, ctx())
    again = spec.compute(m, tok(), STREAM[:1], cfg, c)
    assert again.meta["rls"]["previous_batches"] == 0
    for ua, ub in zip(fresh.updates, again.updates):
        assert all(torch.equal(a, b) for a, b in zip(ua.tensors().values(), ub.tensors().values()))
    apply_revert_exact(m, again)


def test_rls_bad_config_is_refused():
    m = model("gpt2")
    with pytest.raises(ValueError, match="mom2_update_weight must be > 0"):
        get_method("rls").compute(m, tok(), REQS[:1], config("rls", mom2_update_weight=0.0), ctx())
    with pytest.raises(ValueError, match="ridge must be"):
        get_method("rls").compute(m, tok(), REQS[:1], config("rls", ridge=-1.0), ctx())
