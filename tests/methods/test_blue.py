"""BLUE (Li et al., arXiv 2502.03748) on tiny gpt2/llama models: exactly the first and last critical layers change,
each residual is undivided and measured at its own layer, and the second layer's target is re-optimised on the
partially edited model; the `strategy="blue"` flag and the registered "-blue" names agree (the CLI maps
``--method memit --strategy blue`` to ``memit-blue``)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

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

from kedit.arch import get_adapter, math_weight
from kedit.core.targets import Site
from kedit.core.walk import site_values
from kedit.methods.registry import get_method

EXTRA = {
    "memit-blue": {"mom2_update_weight": 50.0},
    "pmet-blue": {"mom2_update_weight": 50.0},
    "alphaedit-blue": {"nullspace_mode": "relative", "nullspace_threshold": 0.05, "l2": 0.5},
}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["memit-blue", "pmet-blue", "alphaedit-blue"])
def test_blue_invariants(arch, method):
    m = model(arch)
    cfg = config(method, **EXTRA[method])
    assert cfg.strategy == "blue"
    c = ctx()
    before = snapshot(m)
    delta = get_method(method).compute(m, tok(), REQS, cfg, c)
    assert unchanged(m, before)
    adapter = get_adapter(m)
    first, last = LAYERS[0], LAYERS[-1]
    assert delta.method == method
    assert sorted(delta.params) == sorted(adapter.weight_name("mlp_out", l) for l in (first, last))
    recorded = stages(delta)
    assert [s["layer"] for s in recorded] == [first, last]
    slot = "mlp_out" if method.startswith("pmet") else "block"
    for st in recorded:
        assert st["target_layer"] == st["layer"] and st["fraction"] == 1.0
        assert torch.allclose(st["R"], st["Z"] - st["H"], atol=1e-6)  # undivided
        assert torch.allclose(st["v0"], st["H"], atol=1e-4)  # targets optimised at this layer, current model
        if method != "alphaedit-blue":
            C = second_moment(m, c, st["layer"])
            K, R = st["K"], st["R"]
            assert_close_rel(
                math_delta(m, delta, st["layer"]), numpy_ridge_delta(K, R, C, cfg.mom2_update_weight), rtol=1e-6
            )
    # z at the last layer was optimised on the model with the first layer's update applied
    v0_last = recorded[1]["v0"].T.float()
    site = Site(slot, last)
    unedited = site_values(m, tok(), adapter, site, REQS)
    module = adapter.module(m, "mlp_out", first)
    orig = module.weight.detach().clone()
    with torch.no_grad():
        math_weight(module).add_(math_delta(m, delta, first).float())
    try:
        partial = site_values(m, tok(), adapter, site, REQS)
    finally:
        with torch.no_grad():
            module.weight.copy_(orig)
    assert unchanged(m, before)
    err_partial = float((v0_last - partial).norm())
    err_unedited = float((v0_last - unedited).norm())
    assert err_partial <= 1e-4 * float(partial.norm())
    assert err_unedited > 100 * err_partial
    apply_revert_exact(m, delta)


def test_strategy_flag_equals_registered_name():
    m = model("gpt2")
    a = get_method("memit").compute(
        m, tok(), REQS, config("memit", strategy="blue", mom2_update_weight=50.0), ctx()
    )
    b = get_method("memit-blue").compute(m, tok(), REQS, config("memit-blue", mom2_update_weight=50.0), ctx())
    assert a.params == b.params
    for ua, ub in zip(a.updates, b.updates):
        assert torch.allclose(ua.dense(), ub.dense(), atol=1e-6)
    with pytest.raises(ValueError, match="strategy"):
        get_method("memit").compute(m, tok(), REQS, config("memit", strategy="bogus"), ctx())


def test_blue_presets_and_cli_names():
    from transformers import AutoConfig

    from kedit.cli import _method_name

    for base in ("memit", "pmet", "alphaedit"):
        assert get_method(_method_name(base, "blue")).name == f"{base}-blue"
    gptj = AutoConfig.for_model("gptj", n_layer=28)
    assert get_method("alphaedit-blue").default_config(gptj).l2 == 95.0
    assert get_method("pmet-blue").default_config(gptj).mom2_update_weight == 1000.0
    assert get_method("memit-blue").default_config(gptj).layers == (3, 8)
    assert get_method("memit").default_config(gptj).layers == (3, 4, 5, 6, 7, 8)
    assert get_method("alphaedit-blue").default_config(model("gpt2")).strategy == "blue"
