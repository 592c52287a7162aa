"""LoRA via peft: the model is left bit-identical and free of peft wrappers, the exported low-rank delta equals
what peft computes (orientation and scaling, Conv1D and Linear), the target probability rises, results are
seeded, and a missing peft gives a clear error."""

from __future__ import annotations

import os
import sys

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

peft = pytest.importorskip("peft")

from kedit.arch import get_adapter
from kedit.deltas import EditDelta, LowRankUpdate
from kedit.methods.ft.objective import teacher_forced_logprob
from kedit.methods.lora import lora_factors
from kedit.methods.registry import get_method
from kedit.requests import EditRequest
from kedit.testing import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")

REQ = EditRequest("{} plays the", "Toko Yasuda", "trumpet", target_true="guitar")


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


def _tuner_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_leaves_model_untouched_and_edits(arch, tok):
    model = tiny_model(arch, vocab_size=len(tok))
    model.train()  # the mode must be restored too
    modules = {n: type(m) for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = _state(model)
    spec = get_method("lora")
    cfg = spec.make_config({"layers": (1, 2), "slots": ("mlp_out", "attn_out"), "rank": 2, "epochs": 6})
    model.eval()
    lp0 = teacher_forced_logprob(model, tok, REQ)
    model.train()
    delta = spec.compute(model, tok, [REQ], cfg, None)
    assert model.training
    assert {n: type(m) for n, m in model.named_modules()} == modules
    assert not _tuner_layers(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(before) == set(model.state_dict())
    model.eval()
    adapter = get_adapter(model)
    expected = {adapter.weight_name(s, layer) for s in ("mlp_out", "attn_out") for layer in (1, 2)}
    assert set(delta.params) == expected
    assert all(isinstance(u, LowRankUpdate) and u.rank == 2 for u in delta.updates)
    with delta.applied(model):
        assert teacher_forced_logprob(model, tok, REQ) > lp0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # seeded: the same call gives the same delta
    again = spec.compute(model, tok, [REQ], cfg, None)
    for u, v in zip(delta.updates, again.updates):
        assert torch.equal(u.dense(), v.dense())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("rslora", [False, True])
def test_exported_delta_matches_peft(arch, rslora, tok):
    """ΔW = scaling·B A in the right orientation: the base model with the kedit delta applied reproduces the
    peft model's logits (GPT-2 Conv1D and Llama Linear)."""
    model = tiny_model(arch, vocab_size=len(tok))
    adapter = get_adapter(model)
    paths = [adapter.path("mlp_out", 1), adapter.path("attn_out", 2)]
    cfg = peft.LoraConfig(
        r=3, lora_alpha=5.0, target_modules=paths, fan_in_fan_out=(arch == "gpt2"), use_rslora=rslora
    )
    ids = torch.tensor([tok(REQ.text)["input_ids"]])
    with torch.random.fork_rng():
        torch.manual_seed(1)
        pm = peft.get_peft_model(model, cfg, adapter_name="t")
        for p in paths:
            torch.nn.init.normal_(
                model.get_submodule(p).lora_B["t"].weight
            )  # B = 0 at init: make it non-zero
    with torch.no_grad():
        want = model(input_ids=ids).logits
    factors = lora_factors(model, paths, "t")
    pm.unload()
    updates = [
        LowRankUpdate.from_math(model, f"{p}.weight", left, right) for p, (left, right) in factors.items()
    ]
    delta = EditDelta.for_model(model, updates, method="lora")
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with delta.applied(model):
            got = model(input_ids=ids).logits
    assert not torch.allclose(base, want, atol=1e-3)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_errors(tok, monkeypatch):
    model = tiny_model("gpt2", vocab_size=len(tok))
    spec = get_method("lora")
    with pytest.raises(ValueError, match="out of range"):
        spec.compute(model, tok, [REQ], spec.make_config({"layers": (9,)}), None)
    with pytest.raises(ValueError, match="slot"):
        spec.compute(model, tok, [REQ], spec.make_config({"slots": ("final_norm",)}), None)
    # a model that already carries peft adapters is refused (unload would drop the user's adapters)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=1, target_modules=["c_attn"], fan_in_fan_out=True))
    with pytest.raises(ValueError, match="already carries peft"):
        spec.compute(model, tok, [REQ], spec.make_config({"epochs": 1}), None)
    pm.unload()
    monkeypatch.setitem(sys.modules, "peft", None)  # simulate a missing optional dependency
    with pytest.raises(ImportError, match=r"kedit\[lora\]"):
        spec.compute(model, tok, [REQ], spec.make_config({"epochs": 1}), None)
