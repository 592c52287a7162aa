"""PMET invariants (Li et al., AAAI 2024) on tiny gpt2/llama models: only MLP output projections change (attention
weights bit-identical), targets are the MLP output m* optimised next to the attention output, the residual is
spread 1/√(L−j+1), per-layer normal equations hold, apply→revert is exact."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import math

import pytest
import torch
from lte_common import (
    LAYERS,
    REQS,
    apply_revert_exact,
    assert_close_rel,
    config,
    ctx,
    math_delta,
    model,
    numpy_ridge_delta,
    second_moment,
    snapshot,
    stages,
    tok,
    unchanged,
)

from kedit.arch import get_adapter
from kedit.methods.registry import get_method


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_pmet_invariants(arch):
    m = model(arch)
    cfg = config("pmet", mom2_update_weight=50.0)
    c = ctx()
    before = snapshot(m)
    delta = get_method("pmet").compute(m, tok(), REQS, cfg, c)
    assert unchanged(m, before)
    adapter = get_adapter(m)
    mlp_out = {adapter.weight_name("mlp_out", l) for l in LAYERS}
    assert set(delta.params) == mlp_out
    recorded = stages(delta)
    # the value site is the MLP output: v_0 is the current m^{l_L}
    assert torch.allclose(recorded[0]["v0"], recorded[0]["H"], atol=1e-4)
    for j, st in enumerate(recorded):
        assert st["target_layer"] == LAYERS[-1]
        assert st["fraction"] == pytest.approx(1 / math.sqrt(len(LAYERS) - j))
        assert torch.allclose(st["R"], st["fraction"] * (st["Z"] - st["H"]), atol=1e-6)
        K, R = st["K"], st["R"]
        delta_j = math_delta(m, delta, st["layer"])
        C = second_moment(m, c, st["layer"])
        assert_close_rel(delta_j, numpy_ridge_delta(K, R, C, cfg.mom2_update_weight), rtol=1e-6)
        assert torch.linalg.matrix_rank(delta_j, rtol=1e-6).item() <= len(REQS)
    # attention parameters are never touched, also after applying
    attn_prefixes = tuple(adapter.path("attn", l) + "." for l in range(adapter.num_layers(m)))
    delta.apply(m)
    try:
        after = m.state_dict()
        for name, t in before.items():
            if name.startswith(attn_prefixes) or name not in mlp_out:
                assert torch.equal(t, after[name]), name
    finally:
        delta.revert(m)
    assert unchanged(m, before)
    apply_revert_exact(m, delta)

