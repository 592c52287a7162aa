import os

os.environ["HF_HUB_OFFLINE"] = "1"

import copy
import time

import pytest
import torch
from torch import nn

from kedit.fingerprint import model_fingerprint, tensor_fingerprint
from kedit.testing import tiny_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_tensor_fingerprint_exact(dtype):
    t = torch.randn(7, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    fp = tensor_fingerprint(t)
    assert len(fp) == 64 and fp == tensor_fingerprint(t.clone())
    u = t.clone()
    u.view(-1)[17] = torch.nextafter(u.view(-1)[17].float(), torch.tensor(float("inf"))).to(dtype)
    if not torch.equal(u, t):  # one ulp (or more, after the cast) up
        assert tensor_fingerprint(u) != fp
    assert tensor_fingerprint(t.reshape(5, 7)) != fp  # shape is hashed
    assert tensor_fingerprint(t.T.contiguous()) == tensor_fingerprint(t.T)  # layout independent


def test_tensor_fingerprint_dtype_and_special_cases():
    bits = torch.arange(12, dtype=torch.int16)
    assert tensor_fingerprint(bits.view(torch.bfloat16)) != tensor_fingerprint(bits.view(torch.float16))
    assert tensor_fingerprint(bits.view(torch.bfloat16)) != tensor_fingerprint(bits)
    assert tensor_fingerprint(torch.tensor(1.0)) != tensor_fingerprint(torch.tensor([1.0]))
    assert tensor_fingerprint(torch.empty(0, 3)) != tensor_fingerprint(torch.empty(3, 0))
    assert tensor_fingerprint(torch.tensor([True, False])) != tensor_fingerprint(torch.tensor([False, True]))
    p = nn.Parameter(torch.ones(3))
    assert tensor_fingerprint(p) == tensor_fingerprint(torch.ones(3))
    with pytest.raises(ValueError, match="meta"):
        tensor_fingerprint(torch.empty(2, device="meta"))


def test_model_fingerprint_identity_and_sensitivity():
    m = tiny_model("llama")
    fp = model_fingerprint(m)
    assert fp == model_fingerprint(copy.deepcopy(m)) == model_fingerprint(tiny_model("llama"))
    assert model_fingerprint(tiny_model("llama", seed=1)) != fp
    assert model_fingerprint(tiny_model("llama", dtype=torch.bfloat16)) != fp  # dtype from the parameters
    assert model_fingerprint(tiny_model("llama", rms_norm_eps=1e-5)) != fp  # config (same weights)
    assert model_fingerprint(tiny_model("mistral")) != fp  # same shapes, other architecture
    # bookkeeping keys of the config do not matter
    m2 = copy.deepcopy(m)
    m2.config._name_or_path = "/somewhere/else"
    m2.config.use_cache = not m2.config.use_cache
    assert model_fingerprint(m2) == fp
    # a single element of a small parameter (fully hashed) matters
    with torch.no_grad():
        m2.model.norm.weight[3] += 1e-3
    assert model_fingerprint(m2) != fp
    # a rank-one edit changes every element of the touched rows/columns
    m3 = copy.deepcopy(m)
    w = m3.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        w += 1e-3 * torch.outer(torch.randn(w.shape[0]), torch.randn(w.shape[1]))
    assert model_fingerprint(m3, sample_size=16) != model_fingerprint(m, sample_size=16)


def test_sampled_vs_full_trade_off():
    m = tiny_model("gpt2")
    m2 = copy.deepcopy(m)
    p = m2.transformer.h[0].mlp.c_fc.weight  # 32 x 128 = 4096 elements
    with torch.no_grad():
        p.view(-1)[1] += 1.0  # stride is ceil(4096 / 64) = 64: element 1 is not sampled
    assert model_fingerprint(m2, sample_size=64) == model_fingerprint(m, sample_size=64)
    assert model_fingerprint(m2, full=True) != model_fingerprint(m, full=True)
    assert model_fingerprint(m2) != model_fingerprint(m)  # the default samples all of a small tensor
    assert model_fingerprint(m, full=True) != model_fingerprint(m)  # modes are distinguished
    with pytest.raises(ValueError):
        model_fingerprint(m, sample_size=0)


def test_sampled_fingerprint_is_cheap_on_large_weights():
    big = nn.Sequential(*[nn.Linear(2048, 4096, bias=False) for _ in range(4)])  # 33.5M params, 134 MB
    t0 = time.perf_counter()
    sampled = model_fingerprint(big)
    t_sampled = time.perf_counter() - t0
    t0 = time.perf_counter()
    full = model_fingerprint(big, full=True)
    t_full = time.perf_counter() - t0
    assert sampled != full
    assert t_sampled < t_full  # reads < 1% of the bytes
