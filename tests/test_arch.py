import os

os.environ["HF_HUB_OFFLINE"] = "1"

import types
import uuid

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from kedit import arch
from kedit.arch import (
    GLOBAL_SLOTS,
    LAYER_SLOTS,
    UnsupportedArchitectureError,
    get_adapter,
    is_transposed,
    math_weight,
    register_adapter,
    to_storage,
)
from kedit.testing import TINY_FAMILIES, tiny_model

GATED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"}
HIDDEN = 32  # tiny_config default width


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f) for f in TINY_FAMILIES}


def _module_out(module, k):
    with torch.no_grad():
        y = module(k)
    return y - module.bias if getattr(module, "bias", None) is not None else y


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_adapter_and_slots(models, family):
    model = models[family]
    adapter = get_adapter(model)
    assert family in adapter.model_types
    assert get_adapter(model.config) is adapter and get_adapter(family) is adapter
    for slot in GLOBAL_SLOTS:
        assert isinstance(adapter.module(model, slot), nn.Module)
    assert adapter.module(model, "embed") is model.get_input_embeddings()
    assert adapter.module(model, "unembed") is model.get_output_embeddings()
    layers = adapter.module(model, "layers")
    assert isinstance(layers, nn.ModuleList) and len(layers) == adapter.num_layers(model) == 4
    for layer in (0, 3):
        for slot in LAYER_SLOTS:
            if slot == "mlp_gate" and family not in GATED:
                with pytest.raises(ValueError, match="does not exist"):
                    adapter.module(model, slot, layer)
                continue
            module = adapter.module(model, slot, layer)
            assert isinstance(module, nn.Module)
            if slot in ("attn_out", "mlp_in", "mlp_gate", "mlp_out"):
                assert isinstance(module, (nn.Linear, Conv1D))
        assert adapter.module(model, "block", layer) is layers[layer]
    assert (adapter.mlp_gate is not None) == (family in GATED)
    assert adapter.mlp_post_norm == (family == "gemma2")
    with pytest.raises(ValueError, match="global"):
        adapter.path("embed", 0)
    with pytest.raises(ValueError, match="per-layer"):
        adapter.path("mlp_out")
    with pytest.raises(ValueError, match="unknown slot"):
        adapter.path("mlp_outt", 0)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_orientation(models, family):
    model = models[family]
    adapter = get_adapter(model)
    torch.manual_seed(0)
    for slot in ("mlp_out", "attn_out", "mlp_in"):  # attn_out is square (32 x 32): shape guessing would fail
        module = adapter.module(model, slot, 1)
        w = math_weight(module)
        if slot == "mlp_out":
            assert tuple(w.shape) == (adapter.hidden_size(model), adapter.key_size(model, 1))
            assert w.shape[0] == HIDDEN
        k = torch.randn(w.shape[1])
        torch.testing.assert_close(w @ k, _module_out(module, k), atol=1e-5, rtol=1e-5)
        delta = torch.randn(w.shape)
        assert to_storage(module, delta).shape == module.weight.shape
        assert is_transposed(module) == (family == "gpt2")


def test_square_conv1d_orientation(models):
    model = models["gpt2"]
    module = get_adapter(model).module(model, "attn_out", 0)
    assert isinstance(module, Conv1D) and module.weight.shape[0] == module.weight.shape[1]
    w = math_weight(module)
    assert torch.equal(w, module.weight.T)
    delta = torch.arange(w.numel(), dtype=torch.float32).reshape(w.shape) * 1e-3  # not symmetric
    k = torch.randn(w.shape[1])
    with torch.no_grad():
        base = _module_out(module, k)
        module.weight.add_(to_storage(module, delta))
        try:
            torch.testing.assert_close(_module_out(module, k) - base, delta @ k, atol=1e-4, rtol=1e-4)
        finally:
            module.weight.sub_(to_storage(module, delta))


def test_is_transposed_rejects_other_modules():
    with pytest.raises(TypeError, match="Embedding"):
        is_transposed(nn.Embedding(3, 4))


def test_layer_index_checks(models):
    model = models["llama"]
    adapter = get_adapter(model)
    assert adapter.module(model, "mlp_out", -1) is adapter.module(model, "mlp_out", 3)
    assert adapter.module(model, "mlp_out", -4) is adapter.module(model, "mlp_out", 0)
    assert adapter.check_layer(model, -2) == 2
    for bad in (4, -5, 100):
        with pytest.raises(ValueError, match=r"out of range for a model with 4 layers"):
            adapter.module(model, "mlp_out", bad)
    with pytest.raises(ValueError, match="must be an int"):
        adapter.check_layer(model, 1.0)
    with pytest.raises(ValueError, match="must be an int"):
        adapter.check_layer(model, True)


def test_unsupported_architecture():
    with pytest.raises(UnsupportedArchitectureError, match=r"'bloom_x'.*register_adapter"):
        get_adapter("bloom_x")
    fake = types.SimpleNamespace(config=types.SimpleNamespace(model_type="made_up_lm"))
    with pytest.raises(UnsupportedArchitectureError, match=r"'made_up_lm'.*register_adapter"):
        get_adapter(fake)
    with pytest.raises(UnsupportedArchitectureError, match="no config.model_type"):
        get_adapter(nn.Linear(2, 2))


def test_register_adapter_custom_type(models):
    name = f"my_llama_{uuid.uuid4().hex[:8]}"
    custom = arch.replace(get_adapter("llama"), model_types=(name,))
    try:
        register_adapter(custom)
        assert get_adapter(name) is custom and name in arch.registered_model_types()
        model = models["llama"]
        fake = types.SimpleNamespace(config=types.SimpleNamespace(model_type=name))
        assert get_adapter(fake).module(model, "mlp_out", 0) is model.model.layers[0].mlp.down_proj
        with pytest.raises(ValueError, match="already registered.*overwrite=True"):
            register_adapter(arch.replace(custom, mlp_gate=None))
        assert get_adapter(name) is custom  # refused registration changed nothing
        other = arch.replace(custom, mlp_gate=None)
        register_adapter(other, overwrite=True)
        assert get_adapter(name) is other
        with pytest.raises(ValueError, match="already registered"):
            register_adapter(arch.replace(custom, model_types=(name + "_b", "llama")))
        assert name + "_b" not in arch.registered_model_types()  # all-or-nothing
    finally:
        arch._REGISTRY.pop(name, None)
        arch._REGISTRY.pop(name + "_b", None)
