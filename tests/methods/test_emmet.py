"""EMMET invariants (Gupta et al. 2024) on tiny gpt2/llama models: with emmet_lambda = 0 the edit constraint
ΔK = R holds exactly for the recorded keys and residuals; the ridge relaxes it; compute never mutates the model."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from lte_common import (
    REQS,
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
from kedit.methods.registry import get_method


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_emmet_equality_constraint(arch):
    m = model(arch)
    before = snapshot(m)
    delta = get_method("emmet").compute(
        m, tok(), REQS, config("emmet", layers=(1, 2), emmet_lambda=0.0), ctx()
    )
    assert unchanged(m, before)
    adapter = get_adapter(m)
    assert sorted(delta.params) == sorted(adapter.weight_name("mlp_out", l) for l in (1, 2))
    for j, st in enumerate(stages(delta)):
        assert st["fraction"] == pytest.approx(1 / (2 - j))
        delta_j = math_delta(m, delta, st["layer"])
        assert_close_rel(delta_j @ st["K"], st["R"], rtol=1e-4)
        assert torch.linalg.matrix_rank(delta_j, rtol=1e-6).item() <= len(REQS)
    apply_revert_exact(m, delta)


def test_emmet_ridge_relaxes_and_single_auto_layer():
    m = model("gpt2")
    spec = get_method("emmet")
    cfg = config("emmet", layers=None, emmet_lambda=10.0, mom2_update_weight=1.0)
    delta = spec.compute(m, tok(), REQS, cfg, ctx())
    assert delta.meta["edited_layers"] == [1]  # ~1/4 of 4 layers, as ROME
    (st,) = stages(delta)
    delta_j = math_delta(m, delta, 1)
    assert not torch.allclose(delta_j @ st["K"], st["R"], rtol=1e-2, atol=1e-6)
    with pytest.raises(ValueError, match="strategy"):
        spec.compute(m, tok(), REQS, config("emmet", strategy="blue"), ctx())
