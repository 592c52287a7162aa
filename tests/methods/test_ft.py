"""FT-L / FT-M invariants (METHODS.md §1) on tiny random models: only the named parameters change, the L∞ clamp
holds exactly, FT-M's loss ignores prompt-position logits, FT-M ids are prompt ids + target ids, the target
probability rises, and compute leaves the model bit-identical."""

from __future__ import annotations

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from kedit.arch import get_adapter
from kedit.core.keys import target_ids
from kedit.methods.ft.objective import build_loss_batches, request_losses, teacher_forced_logprob
from kedit.methods.registry import get_method
from kedit.requests import EditRequest
from kedit.testing import tiny_model, tiny_tokenizer

REQ = EditRequest("{} plays the", "Toko Yasuda", "trumpet", target_true="guitar")
REQ2 = EditRequest("The capital of {} is", "France", "Berlin")


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


def _same(model, before) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("name", ["ft-l", "ft-m"])
def test_only_named_params_change_and_target_rises(arch, name, tok):
    model = tiny_model(arch, vocab_size=len(tok))
    spec = get_method(name)
    cfg = spec.make_config({"layers": (1,), "lr": 1e-2, "epochs": 6})
    before = _state(model)
    flags = [p.requires_grad for p in model.parameters()]
    lp0 = teacher_forced_logprob(model, tok, REQ)
    delta = spec.compute(model, tok, [REQ], cfg, None)
    assert _same(model, before), "compute must not mutate the model"
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    expected = get_adapter(model).weight_name("mlp_out", 1)
    assert delta.params == [expected] and delta.method == name
    delta.apply(model)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {expected}
    assert teacher_forced_logprob(model, tok, REQ) > lp0
    delta.revert(model)
    assert _same(model, before)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_linf_clamp_holds(arch, tok):
    model = tiny_model(arch, vocab_size=len(tok))
    spec = get_method("ft-l")
    eps = 1e-3
    cfg = spec.make_config({"layers": (0, 2), "lr": 1e-2, "epochs": 4, "norm_constraint": eps})
    delta = spec.compute(model, tok, [REQ, REQ2], cfg, None)
    assert len(delta.updates) == 2
    eps32 = torch.tensor(eps, dtype=torch.float32)
    for u in delta.updates:
        d = u.dense()
        assert d.abs().max() <= eps32  # exact (ε in fp32): the trained variable is ΔW itself
        assert torch.equal(d.abs().max(), eps32)  # and the clamp was active
    originals = {u.param: model.get_parameter(u.param).detach().clone() for u in delta.updates}
    with delta.applied(model):
        for name, w0 in originals.items():
            diff = (model.get_parameter(name).detach() - w0).abs().max()
            assert float(diff) <= eps * (1 + 1e-5)


def test_ftm_loss_ignores_prompt_logits(tok):
    device = torch.device("cpu")
    (batch,) = build_loss_batches(tok, [REQ, REQ2], "target_new", device)
    for row, req in enumerate([REQ, REQ2]):
        prompt = tok(req.text)["input_ids"]
        tgt = target_ids(tok, req.target_new)
        # ids are the concatenation prompt ids + target ids (last target token is never an input)
        n = len(prompt) + len(tgt) - 1
        assert batch.ids[row, :n].tolist() == prompt + tgt[:-1]
        assert batch.mask[row].sum() == n
    logits = torch.randn(*batch.ids.shape, len(tok), requires_grad=True)
    loss = request_losses(logits, batch).mean()
    (grad,) = torch.autograd.grad(loss, logits)
    for row, req in enumerate([REQ, REQ2]):
        p_len = len(tok(req.text)["input_ids"])
        t_len = len(target_ids(tok, req.target_new))
        nonzero = grad[row].abs().sum(-1) != 0
        scored = torch.zeros_like(nonzero)
        scored[p_len - 1 : p_len - 1 + t_len] = True
        assert torch.equal(nonzero, scored), "only target-predicting positions may get a gradient"
    # per-request mean CE over target tokens, mean over the batch
    lp = torch.log_softmax(logits.detach(), -1)
    exp = []
    for row, req in enumerate([REQ, REQ2]):
        p_len = len(tok(req.text)["input_ids"])
        tgt = target_ids(tok, req.target_new)
        exp.append(-torch.stack([lp[row, p_len - 1 + t, tid] for t, tid in enumerate(tgt)]).mean())
    assert float(loss.detach()) == pytest.approx(float(torch.stack(exp).mean()), rel=1e-5)


def test_ftl_loss_uses_last_prompt_position_only(tok):
    (batch,) = build_loss_batches(tok, [REQ, REQ2], "prompt_last", torch.device("cpu"))
    logits = torch.randn(*batch.ids.shape, len(tok), requires_grad=True)
    (grad,) = torch.autograd.grad(request_losses(logits, batch).sum(), logits)
    for row, req in enumerate([REQ, REQ2]):
        p_len = len(tok(req.text)["input_ids"])
        assert batch.mask[row].sum() == p_len  # no target tokens in the input
        nonzero = torch.nonzero(grad[row].abs().sum(-1)).flatten().tolist()
        assert nonzero == [p_len - 1]
        tgt = target_ids(tok, req.target_new)
        assert int((grad[row, p_len - 1] < 0).sum()) == len(set(tgt))  # every target token is pushed up


def test_batching_bias_and_errors(tok):
    model = tiny_model("gpt2", vocab_size=len(tok))
    spec = get_method("ft-m")
    before = _state(model)
    cfg = spec.make_config({"layers": (1,), "epochs": 2, "lr": 1e-2, "batch_size": 1, "train_bias": True})
    delta = spec.compute(model, tok, [REQ, REQ2], cfg, None)
    names = get_adapter(model).path("mlp_out", 1)
    assert sorted(delta.params) == sorted([f"{names}.weight", f"{names}.bias"])
    assert delta.meta["diagnostics"]["steps"] == 4  # 2 epochs x 2 mini-batches
    assert _same(model, before)
    with pytest.raises(ValueError, match="out of range"):
        spec.compute(model, tok, [REQ], spec.make_config({"layers": (7,)}), None)
    with pytest.raises(ValueError, match="slot"):
        spec.compute(model, tok, [REQ], spec.make_config({"slot": "embed"}), None)
    with pytest.raises(ValueError, match="loss"):
        spec.compute(model, tok, [REQ], spec.make_config({"loss": "bogus"}), None)
    assert _same(model, before)


def test_default_layer_is_middle_and_bf16(tok):
    model = tiny_model("llama", vocab_size=len(tok), dtype=torch.bfloat16)
    spec = get_method("ft-m")
    delta = spec.compute(model, tok, [REQ], spec.make_config({"epochs": 2, "lr": 1e-2}), None)
    assert delta.params == [get_adapter(model).weight_name("mlp_out", 2)]  # round((4 - 1) / 2)
    assert delta.updates[0].dtype == torch.float32
    before = _state(model)
    with delta.applied(model):
        pass
    assert _same(model, before)
