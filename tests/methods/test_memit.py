"""MEMIT invariants (Meng et al. 2023) on tiny gpt2/llama models: compute never mutates the model, the per-layer
normal equations Δ_j(λC_j + K_jK_jᵀ) = R_jK_jᵀ hold for the recorded K_j, R_j, the residual is spread 1/(L−j+1)
of a target optimised once at the last layer, rank(Δ_j) ≤ n, apply→revert is bitwise exact, clear errors."""

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
    numpy_ridge_delta,
    second_moment,
    snapshot,
    stages,
    tok,
    unchanged,
)

from kedit.arch import get_adapter
from kedit.core.context import EditContext
from kedit.core.solve import SingularSystemError
from kedit.methods.registry import get_method


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_memit_invariants(arch):
    m = model(arch)
    spec = get_method("memit")
    cfg = config("memit", mom2_update_weight=50.0)
    c = ctx()
    before = snapshot(m)
    delta = spec.compute(m, tok(), REQS, cfg, c)
    assert unchanged(m, before)
    adapter = get_adapter(m)
    assert delta.method == "memit"
    assert sorted(delta.params) == sorted(adapter.weight_name("mlp_out", l) for l in LAYERS)
    recorded = stages(delta)
    assert [s["layer"] for s in recorded] == list(LAYERS)
    Z = recorded[0]["Z"]
    # v_0 of the target optimiser is the current h at the z-layer (tokenization/index consistency)
    assert torch.allclose(recorded[0]["v0"], recorded[0]["H"], atol=1e-4)
    for j, st in enumerate(recorded):
        assert st["target_layer"] == LAYERS[-1]
        assert torch.equal(st["Z"], Z)  # z computed once, on the unedited model
        assert st["fraction"] == pytest.approx(1 / (len(LAYERS) - j))
        assert torch.allclose(st["R"], st["fraction"] * (st["Z"] - st["H"]), atol=1e-6)
        K, R = st["K"], st["R"]
        delta_j = math_delta(m, delta, st["layer"])
        C = second_moment(m, c, st["layer"])
        assert_close_rel(delta_j, numpy_ridge_delta(K, R, C, cfg.mom2_update_weight), rtol=1e-6)
        assert torch.linalg.matrix_rank(delta_j, rtol=1e-6).item() <= len(REQS)
        (upd,) = [u for u in delta.updates if u.param == adapter.weight_name("mlp_out", st["layer"])]
        assert upd.rank <= len(REQS)
    diag = delta.meta["diagnostics"]
    assert diag["final_residual_norm"] < diag["stages"][0]["residual_norm"]
    apply_revert_exact(m, delta)


def _key_by_hand(m, layer: int, text: str, subject: str) -> torch.Tensor:
    """The input of ``mlp_out`` at ``layer`` at the subject's last token of ``text``, read with a forward hook."""
    enc = tok()(text, return_offsets_mapping=True, return_tensors="pt")
    end = text.index(subject) + len(subject)
    pos = max(i for i, (a, _) in enumerate(enc["offset_mapping"][0].tolist()) if a < end)
    seen = {}

    def hook(mod, args, out):
        seen["k"] = args[0][0, pos].detach()

    handle = get_adapter(m).module(m, "mlp_out", layer).register_forward_hook(hook)
    try:
        with torch.no_grad():
            m(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    finally:
        handle.remove()
    return seen["k"].double()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_memit_first_layer_keys_by_hand(arch):
    """The keys of the first stage (unedited model), recomputed with a hook: ½ k(plain prompt) + ½ mean over the
    prefixed templates -- independent of the code's key extraction."""
    m = model(arch)
    delta = get_method("memit").compute(m, tok(), REQS, config("memit", mom2_update_weight=50.0), ctx())
    K = stages(delta)[0]["K"]
    for i, req in enumerate(REQS):
        prompt = req.prompt.format(req.subject)
        plain = _key_by_hand(m, LAYERS[0], prompt, req.subject)
        prefixed = [_key_by_hand(m, LAYERS[0], t.format(prompt), req.subject) for t in TEMPLATES if t != "{}"]
        expected = 0.5 * plain + 0.5 * torch.stack(prefixed).mean(0)
        assert_close_rel(K[:, i], expected, rtol=1e-4)


def test_memit_edit_reaches_target_with_small_lambda():
    """With λ→0 the last layer's update closes the residual for its (template-averaged) keys, so on the plain
    prompt h^{l_L} ends close to z (not exactly: the plain-prompt key differs from the averaged key)."""
    m = model("llama")
    cfg = config("memit", mom2_update_weight=1e-4, layers=(1, 2))
    delta = get_method("memit").compute(m, tok(), REQS, cfg, ctx())
    diag = delta.meta["diagnostics"]
    assert diag["final_residual_norm"] < 0.1 * diag["stages"][0]["residual_norm"]


def test_memit_errors_name_layer_and_leave_model_unchanged():
    m = model("gpt2")
    spec = get_method("memit")
    with pytest.raises(ValueError, match="MEMIT: layer 99 is out of range"):
        spec.compute(m, tok(), REQS, config("memit", layers=(1, 99)), ctx())
    before = snapshot(m)
    one_text = EditContext(corpus=["Paris."], corpus_id="one", templates=ctx().templates)
    with pytest.raises(SingularSystemError, match="MEMIT layer 0"):
        spec.compute(m, tok(), REQS, config("memit", mom2_update_weight=1.0, mom2_n_tokens=2), one_text)
    assert unchanged(m, before)
    with pytest.raises(ValueError, match="no edit requests"):
        spec.compute(m, tok(), [], config("memit"), ctx())


def test_memit_registered_defaults():
    spec = get_method("memit")
    assert spec.mergeable and spec.batched
    cfg = spec.default_config(model("gpt2"))
    assert cfg.layers is None and cfg.strategy == "spread" and cfg.clamp_norm_factor == 0.75
