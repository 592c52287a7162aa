import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from torch import nn

from kedit.arch import get_adapter, math_weight
from kedit.hooks import StopForward, primary, trace
from kedit.testing import tiny_model


@pytest.fixture(scope="module")
def gpt2():
    return tiny_model("gpt2")


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


IDS = torch.tensor([[5, 17, 42, 9, 100, 7], [3, 3, 250, 8, 1, 60]])


def hook_counts(model):
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_retain_matches_manual(family, gpt2, llama):
    model = gpt2 if family == "gpt2" else llama
    a = get_adapter(model)
    p_mlp, p_block = a.path("mlp_out", 1), a.path("block", 1)
    with torch.no_grad(), trace(model, [p_mlp, p_block], retain_input=True) as tr:
        out = model(IDS, output_hidden_states=True)
    module = model.get_submodule(p_mlp)
    k, v = tr[p_mlp].input, tr[p_mlp].output
    assert k.shape == (2, 6, a.key_size(model)) and v.shape == (2, 6, a.hidden_size(model))
    bias = module.bias if module.bias is not None else 0
    torch.testing.assert_close(v, k @ math_weight(module).T + bias, atol=1e-5, rtol=1e-5)
    # a block's input is the previous block's output; its output is the next hidden state
    torch.testing.assert_close(tr[p_block].input, out.hidden_states[1], atol=0, rtol=0)
    torch.testing.assert_close(tr[p_block].output, out.hidden_states[2], atol=0, rtol=0)
    assert set(tr) == {p_mlp, p_block} and len(tr) == 2


def test_edit_output_equals_manual_addition(gpt2):
    model = gpt2
    a = get_adapter(model)
    last = a.path("block", 3)
    vec = torch.randn(32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with trace(model, [last]) as tr:
            clean = model(IDS).logits
        h = tr[last].output

        def add(name, out):
            assert name == last
            return out + vec

        with trace(model, [last], edit_output=add) as tr2:
            edited = model(IDS).logits
        manual = model.lm_head(a.module(model, "final_norm")(h + vec))
    assert not torch.allclose(edited, clean, atol=1e-3)
    torch.testing.assert_close(edited, manual, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tr2[last].output, h + vec)  # retained after the edit


def test_edit_output_none_keeps_output(llama):
    with torch.no_grad():
        clean = llama(IDS).logits
        with trace(llama, [get_adapter(llama).path("mlp_out", 0)], edit_output=lambda n, o: None):
            same = llama(IDS).logits
    assert torch.equal(clean, same)


def test_stop_early_and_swallowed(gpt2):
    model = gpt2
    a = get_adapter(model)
    started = []
    before = hook_counts(model)
    handles = [
        a.module(model, "block", i).register_forward_pre_hook(lambda m, args, i=i: started.append(i))
        for i in range(4)
    ]
    try:
        with trace(model, [a.path("mlp_out", 1), a.path("mlp_out", 0)], retain_input=True, stop=True) as tr:
            model(IDS)
            pytest.fail("the forward should have been stopped")  # pragma: no cover
    finally:
        for h in handles:
            h.remove()
    assert started == [0, 1]
    assert tr[a.path("mlp_out", 1)].input is not None and tr[a.path("mlp_out", 0)].output is not None
    assert hook_counts(model) == before


def test_hooks_removed_on_exit_and_on_exception():
    # a fresh model: transformers 5 installs its own persistent output-recording hooks on the first call with
    # output_hidden_states=True, so "no hooks at all" only holds for a model never run that way
    model = tiny_model("llama")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    paths = [get_adapter(model).path(s, 2) for s in ("mlp_out", "attn_out", "block")]
    baseline = hook_counts(model)
    with trace(model, paths, retain_input=True, edit_output=lambda n, o: None, edit_input=lambda n, i: None):
        assert hook_counts(model) != baseline
        model(IDS)
    assert hook_counts(model) == baseline
    with pytest.raises(RuntimeError, match="inside"), trace(model, paths, retain_input=True):
        model(IDS)
        raise RuntimeError("inside")
    assert hook_counts(model) == baseline
    with pytest.raises(ZeroDivisionError), trace(model, paths, edit_output=lambda n, o: 1 / 0):
        model(IDS)  # exception raised from inside a hook
    assert hook_counts(model) == baseline
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in model.modules())


def test_kwargs_inputs_captured(llama):
    model = llama
    a = get_adapter(model)
    p = a.path("block", 2)
    with torch.no_grad(), trace(model, [p], retain_input=True) as tr:
        out = model(IDS, output_hidden_states=True)
    torch.testing.assert_close(tr[p].input, out.hidden_states[2], atol=0, rtol=0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, *, hidden_states, scale=1.0):
            return self.lin(hidden_states) * scale

    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return self.block(hidden_states=x, scale=2.0)

    root = Root()
    x = torch.randn(3, 4)
    with torch.no_grad(), trace(root, ["block"], retain_input=True) as tr:
        y = root(x)
    assert torch.equal(tr["block"].input, x) and torch.equal(tr["block"].output, y)
    # editing a kwarg-passed input reaches the module
    with torch.no_grad(), trace(root, ["block"], edit_input=lambda n, h: torch.zeros_like(h)):
        y0 = root(x)
    torch.testing.assert_close(y0, root.block.lin.bias.expand(3, 4) * 2.0)


def test_nested_traces(gpt2):
    model = gpt2
    a = get_adapter(model)
    outer_p, inner_p = a.path("block", 0), a.path("mlp_out", 2)
    baseline = hook_counts(model)
    with torch.no_grad(), trace(model, [outer_p], retain_input=True) as outer:
        with trace(model, [inner_p], edit_output=lambda n, o: o * 0) as inner:
            edited = model(IDS).logits
        after_inner = hook_counts(model)
        clean = model(IDS).logits
    assert hook_counts(model) == baseline
    assert after_inner != baseline  # outer hooks still there after the inner exit
    assert outer[outer_p].input is not None and torch.equal(
        inner[inner_p].output, torch.zeros_like(inner[inner_p].output)
    )
    assert not torch.allclose(edited, clean)


def test_trace_argument_errors(gpt2):
    with pytest.raises(TypeError, match="single string"):
        trace(gpt2, "transformer.h.0")
    with pytest.raises(ValueError, match="at least one"):
        trace(gpt2, [])
    with pytest.raises(AttributeError):
        trace(gpt2, ["transformer.h.99"])
    mods = {"mine": gpt2.transformer.h[0].mlp}
    with torch.no_grad(), trace(gpt2, mods) as tr:
        gpt2(IDS)
    assert tr["mine"].output.shape == (2, 6, 32)


def test_primary_and_stopforward():
    t = torch.ones(2)
    assert primary(t) is t and primary((t, None)) is t and primary([t]) is t
    with pytest.raises(TypeError):
        primary(3)
    assert issubclass(StopForward, Exception)
