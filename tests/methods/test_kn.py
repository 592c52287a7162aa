"""KN invariants (Dai et al. 2022; METHODS.md §12): only the chosen W_out columns change, each by exactly
2(E[o*] − E[o]) (or the per-token sums for multi-token objects); the attribution patches the post-activation
input of mlp_out and satisfies the integrated-gradients completeness axiom; threshold / refinement logic;
compute leaves the model bit-identical."""

from __future__ import annotations

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from kedit.arch import get_adapter, math_weight
from kedit.core.keys import target_ids
from kedit.hooks import trace
from kedit.methods.kn import KNConfig, attribute, edit_vector, knowledge_neurons
from kedit.methods.registry import get_method
from kedit.requests import EditRequest
from kedit.testing import tiny_model, tiny_tokenizer

REQ = EditRequest("The {} is in", "Space Needle", "Paris", target_true="Seattle")  # single-token target


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("target", ["Paris", "trumpet"])
def test_only_chosen_columns_change_by_exact_amount(arch, target, tok):
    model = tiny_model(arch, vocab_size=len(tok))
    req = REQ.with_target(target)
    spec = get_method("kn")
    cfg = spec.make_config({"steps": 3, "batch_size": 32, "layers": (1, 2, 3)})
    before = _state(model)
    delta = spec.compute(model, tok, [req], cfg, None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    (diag,) = delta.meta["diagnostics"]
    chosen = {(layer, i) for layer, i in diag["neurons"]}
    assert chosen
    adapter = get_adapter(model)
    E = adapter.module(model, "embed").weight.detach().float()
    new, old = target_ids(tok, target), diag["original_prediction"]
    assert len(old) == len(new)
    if len(new) == 1:
        amount = 2 * E[new[0]] - 2 * E[old[0]]
    else:
        amount = E[new].sum(0) - E[old].sum(0)  # each token once, no factor 2
    assert torch.equal(edit_vector(E, new, old), amount)
    originals = {
        layer: math_weight(adapter.module(model, "mlp_out", layer)).detach().clone() for layer in (0, 1, 2, 3)
    }
    with delta.applied(model):
        for layer, w0 in originals.items():
            w1 = math_weight(adapter.module(model, "mlp_out", layer)).detach()
            changed = {i for i in range(w0.shape[1]) if not torch.equal(w0[:, i], w1[:, i])}
            expect = {i for (lay, i) in chosen if lay == layer}
            assert changed == expect, f"layer {layer}"
            for i in expect:
                assert torch.equal(w1[:, i], w0[:, i] + amount)  # fp32 model: W + Δ exactly as specified
        changed_params = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
        assert changed_params == {adapter.weight_name("mlp_out", lay) for lay, _ in chosen}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_attribution_completeness(arch, tok):
    """Σ_i IG_i ≈ P(truth | a) − P(truth | a at the last position set to 0), per layer (IG completeness), so the
    hook patches the right tensor (the post-activation input of mlp_out, of size intermediate_size)."""
    model = tiny_model(arch, vocab_size=len(tok))
    adapter = get_adapter(model)
    ids = tok(REQ.text)["input_ids"]
    truth = target_ids(tok, "Seattle")[:1]
    layers = [0, 2]
    scores = attribute(model, adapter, ids, truth, layers, steps=256, batch_size=512)
    d_k = math_weight(adapter.module(model, "mlp_out", 0)).shape[1]
    assert scores.shape == (2, d_k)
    x = torch.tensor([ids])
    with torch.no_grad():
        p_full = torch.softmax(model(input_ids=x).logits[0, -1], -1)[truth[0]]
        for j, layer in enumerate(layers):
            path = adapter.path("mlp_out", layer)

            def zero(name, inp):
                new = inp.clone()
                new[:, -1] = 0
                return new

            with trace(model, [path], retain_output=False, edit_input=zero):
                p_zero = torch.softmax(model(input_ids=x).logits[0, -1], -1)[truth[0]]
            gap = float(p_full - p_zero)
            assert abs(float(scores[j].sum()) - gap) <= 0.02 * abs(gap) + 1e-6


def test_threshold_and_refinement():
    s1 = torch.tensor([[1.0, 0.1, 0.5], [0.0, 0.3, -2.0]])
    s2 = torch.tensor([[0.05, 0.0, 1.0], [0.0, 0.9, 0.0]])
    # coarse: > 0.2·max per prompt; union without refinement, ordered by mean score
    assert knowledge_neurons([s1], KNConfig()) == [(0, 0), (0, 2), (1, 1)]
    assert set(knowledge_neurons([s1, s2], KNConfig())) == {(0, 0), (0, 2), (1, 1)}
    # refine: shared by more than 0.6 of the prompts -> both
    assert set(knowledge_neurons([s1, s2], KNConfig(refine=True, refine_fraction=0.6))) == {(0, 2), (1, 1)}
    assert knowledge_neurons([s1, s2], KNConfig(max_neurons=1)) == [(0, 2)]
    assert knowledge_neurons([-s1.abs()], KNConfig()) == []


def test_errors(tok):
    model = tiny_model("gpt2", vocab_size=len(tok))
    spec = get_method("kn")
    with pytest.raises(ValueError, match="out of range"):
        spec.compute(model, tok, [REQ], spec.make_config({"layers": (4,)}), None)
    with pytest.raises(ValueError, match="adaptive_threshold"):
        spec.compute(model, tok, [REQ], spec.make_config({"adaptive_threshold": 0.0}), None)
