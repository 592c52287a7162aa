import os

os.environ["HF_HUB_OFFLINE"] = "1"

import copy
import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from kedit.arch import get_adapter, math_weight
from kedit.deltas import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    DeltaError,
    DeltaFormatError,
    DeltaStateError,
    DeltaSwallowedError,
    DenseUpdate,
    EditDelta,
    FingerprintMismatchError,
    LowRankUpdate,
    NonFiniteDeltaError,
    load_delta,
)
from kedit.fingerprint import tensor_fingerprint
from kedit.requests import EditRequest
from kedit.testing import tiny_model

FAMILIES = ["gpt2", "llama"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def bases():
    cache = {}

    def get(family, dtype=torch.float32, seed=0):
        key = (family, dtype, seed)
        if key not in cache:
            cache[key] = tiny_model(family, seed=seed, dtype=dtype)
        return copy.deepcopy(cache[key])

    return get


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same_as(model, snap):
    params = dict(model.named_parameters())
    assert params.keys() == snap.keys()
    return all(torch.equal(params[n], snap[n]) for n in snap)


def mlp_out(model, layer=1):
    return get_adapter(model).weight_name("mlp_out", layer)


def attn_out(model, layer=1):
    return get_adapter(model).weight_name("attn_out", layer)


def lowrank(model, name, *, rank=2, scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    module = model.get_submodule(name.rsplit(".", 1)[0])
    out_dim, in_dim = math_weight(module).shape
    left = torch.randn(out_dim, rank, generator=g) * scale
    right = torch.randn(rank, in_dim, generator=g) * scale
    return left, right, LowRankUpdate.from_math(model, name, left, right)


def dense_like(model, name, *, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    p = model.get_parameter(name)
    return DenseUpdate(name, torch.randn(p.shape, generator=g) * scale)


# -- apply / revert ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_apply_revert_bitwise(bases, family, dtype):
    model = bases(family, dtype)
    snap = snapshot(model)
    _, _, u1 = lowrank(model, mlp_out(model))
    u2 = dense_like(model, attn_out(model))
    delta = EditDelta.for_model(model, [u1, u2], method="test")
    delta.apply(model)
    assert delta.is_applied
    assert not torch.equal(model.get_parameter(u1.param), snap[u1.param])
    assert not torch.equal(model.get_parameter(u2.param), snap[u2.param])
    assert {e["status"] for e in delta.apply_report.values()} == {"ok"}
    delta.revert(model)
    assert not delta.is_applied
    assert same_as(model, snap)
    assert all(model.get_parameter(n).dtype == dtype for n in delta.params)


@pytest.mark.parametrize("family", FAMILIES)
def test_from_math_matches_math_orientation(bases, family):
    model = bases(family)
    names = [mlp_out(model), attn_out(model)]  # gpt2 attn c_proj is a SQUARE Conv1D
    for name in names:
        module = model.get_submodule(name.rsplit(".", 1)[0])
        before = math_weight(module).detach().clone()
        left, right, upd = lowrank(model, name, rank=3)
        with EditDelta.for_model(model, [upd], method="t").applied(model):
            after = math_weight(module).detach().clone()
        torch.testing.assert_close(after - before, left @ right, atol=1e-6, rtol=0)
        # square: only the orientation logic tells a product from its transpose
        if before.shape[0] == before.shape[1]:
            assert not torch.allclose((left @ right).T, after - before, atol=1e-4)
        dense = DenseUpdate.from_math(model, name, left @ right)
        torch.testing.assert_close(dense.dense(), upd.dense(), atol=1e-6, rtol=0)
        assert upd.rank == 3
        assert upd.norm() == pytest.approx(float(torch.linalg.norm(upd.dense().double())), rel=1e-5)


def test_from_math_rejects_wrong_shape(bases):
    model = bases("gpt2")
    name = mlp_out(model)
    out_dim, in_dim = math_weight(model.get_submodule(name.rsplit(".", 1)[0])).shape
    with pytest.raises(ValueError, match="storage orientation"):
        LowRankUpdate.from_math(model, name, torch.randn(in_dim, 1), torch.randn(1, out_dim))
    with pytest.raises(ValueError, match="weight of a Linear/Conv1D"):
        LowRankUpdate.from_math(
            model, name.replace(".weight", ".bias"), torch.randn(out_dim), torch.randn(in_dim)
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_stacked_lifo_exact_and_out_of_order_refused(bases, family, dtype):
    model = bases(family, dtype)
    name = mlp_out(model)
    snaps, deltas = [], []
    for i in range(3):
        snaps.append(snapshot(model))
        _, _, u = lowrank(model, name, seed=i)
        d = EditDelta.for_model(model, [u, dense_like(model, attn_out(model), seed=10 + i)], method="t")
        deltas.append(d.apply(model))
    top = snapshot(model)
    with pytest.raises(DeltaStateError, match="LIFO"):
        deltas[0].revert(model)
    with pytest.raises(DeltaStateError, match="LIFO"):
        deltas[1].revert(model)
    assert same_as(model, top)  # refused reverts change nothing
    for d, snap in zip(reversed(deltas), reversed(snaps)):
        d.revert(model)
        assert same_as(model, snap)


def test_apply_state_errors(bases):
    model = bases("llama")
    _, _, u = lowrank(model, mlp_out(model))
    d = EditDelta.for_model(model, [u], method="t")
    with pytest.raises(DeltaStateError, match="not applied"):
        d.revert(model)
    d.apply(model)
    with pytest.raises(DeltaStateError, match="already applied"):
        d.apply(model)
    other = bases("llama")
    with pytest.raises(DeltaStateError, match="different model"):
        d.revert(other)
    d.revert(model)


def test_fingerprint_mismatch_refused(bases):
    model, other = bases("gpt2", seed=0), bases("gpt2", seed=1)
    _, _, u = lowrank(model, mlp_out(model))
    d = EditDelta.for_model(model, [u], method="t")
    snap = snapshot(other)
    with pytest.raises(
        FingerprintMismatchError, match="different base model / state.*order they were computed"
    ):
        d.apply(other)
    assert same_as(other, snap) and not d.is_applied
    d.apply(other, check=False)  # explicit override
    assert not same_as(other, snap)
    d.revert(other)
    assert same_as(other, snap)


def test_out_of_order_apply_refused(bases):
    model = bases("llama")
    base = snapshot(model)
    d1 = EditDelta.for_model(model, [lowrank(model, mlp_out(model), seed=1)[2]], method="t").apply(model)
    d2 = EditDelta.for_model(model, [lowrank(model, mlp_out(model), seed=2)[2]], method="t")
    d1.revert(model)
    with pytest.raises(FingerprintMismatchError):
        d2.apply(model)  # computed on top of d1
    assert same_as(model, base)


def test_non_finite_refused(bases):
    model = bases("llama")
    name = mlp_out(model)
    p = model.get_parameter(name)
    with pytest.raises(NonFiniteDeltaError, match="NaN/Inf"):
        LowRankUpdate(name, torch.full((p.shape[0], 1), float("nan")), torch.ones(1, p.shape[1]))
    with pytest.raises(NonFiniteDeltaError):
        DenseUpdate(name, torch.full(p.shape, float("inf")))
    # tensors corrupted after construction are caught at apply time
    u = dense_like(model, name)
    d = EditDelta.for_model(model, [u], method="t")
    u.delta[0, 0] = float("nan")
    snap = snapshot(model)
    with pytest.raises(NonFiniteDeltaError):
        d.apply(model)
    assert same_as(model, snap)


def test_fp16_overflow_refused_and_restored(bases):
    model = bases("gpt2", torch.float16)
    snap = snapshot(model)
    ok = dense_like(model, attn_out(model))
    name = mlp_out(model)
    huge = DenseUpdate(name, torch.full(model.get_parameter(name).shape, 1e6))  # finite in fp32, inf in fp16
    d = EditDelta.for_model(model, [ok, huge], method="t")
    with pytest.raises(NonFiniteDeltaError, match="overflow"):
        d.apply(model)
    assert same_as(model, snap) and not d.is_applied


def test_bf16_swallowed_delta_refused(bases):
    model = bases("llama", torch.bfloat16)
    snap = snapshot(model)
    name = mlp_out(model)
    w = model.get_parameter(name).detach().float()
    tiny = DenseUpdate(name, w * 1e-8)
    d = EditDelta.for_model(model, [tiny], method="t")
    with pytest.raises(DeltaSwallowedError, match=rf"{name}.*bfloat16"):
        d.apply(model)
    assert same_as(model, snap) and not d.is_applied
    # the same delta is fine in fp32
    model32 = bases("llama")
    tiny32 = DenseUpdate(name, model32.get_parameter(name).detach() * 1e-4)
    EditDelta.for_model(model32, [tiny32], method="t").apply(model32)


def test_bf16_partly_swallowed_warns(bases, caplog):
    model = bases("llama", torch.bfloat16)
    snap = snapshot(model)
    name = mlp_out(model)
    w = model.get_parameter(name).detach().float()
    d = EditDelta.for_model(model, [DenseUpdate(name, w * 3e-3)], method="t")  # ~half an ulp of bf16
    with caplog.at_level(logging.WARNING, logger="kedit.deltas"):
        d.apply(model)
    entry = d.apply_report[name]
    assert entry["status"] == "partial" and entry["dtype"] == "bfloat16"
    assert any("partly swallowed" in r.getMessage() for r in caplog.records)
    d.revert(model)
    assert same_as(model, snap)


class _Exploding(DenseUpdate):
    def dense(self, dtype=torch.float32, device=None):
        raise RuntimeError("boom")


@pytest.mark.parametrize("failure", ["exception", "swallowed"])
def test_all_or_nothing(bases, failure):
    dtype = torch.bfloat16 if failure == "swallowed" else torch.float32
    model = bases("gpt2", dtype)
    snap = snapshot(model)
    u1 = lowrank(model, mlp_out(model, 0))[2]
    u2 = dense_like(model, attn_out(model, 0))
    name3 = mlp_out(model, 2)
    w3 = model.get_parameter(name3).detach().float()
    u3 = _Exploding(name3, w3) if failure == "exception" else DenseUpdate(name3, w3 * 1e-9)
    d = EditDelta.for_model(model, [u1, u2, u3], method="t")
    with pytest.raises(RuntimeError if failure == "exception" else DeltaSwallowedError):
        d.apply(model)
    assert same_as(model, snap)
    assert not d.is_applied


def test_applied_context_manager_restores_on_exception(bases):
    model = bases("llama")
    snap = snapshot(model)
    d = EditDelta.for_model(model, [lowrank(model, mlp_out(model))[2]], method="t")
    with pytest.raises(KeyError), d.applied(model) as inner:
        assert inner is d and d.is_applied
        assert not same_as(model, snap)
        raise KeyError("inside")
    assert same_as(model, snap) and not d.is_applied


def test_construction_validation(bases):
    model = bases("llama")
    u = dense_like(model, mlp_out(model))
    with pytest.raises(ValueError, match="twice"):
        EditDelta([u, u])
    with pytest.raises(ValueError, match="at least one"):
        EditDelta([])
    with pytest.raises(TypeError, match="JSON"):
        EditDelta([u], config={"x": object()})
    bad = DenseUpdate(u.param, torch.zeros(3, 3))
    with pytest.raises(DeltaError, match="shape"):
        EditDelta([bad]).apply(model)


# -- persistence -------------------------------------------------------------------------------------------------
def _saved_delta(model, tmp_path):
    req = EditRequest("{} is located in", "The Eiffel Tower", "Rome")
    u1 = lowrank(model, mlp_out(model))[2]
    u2 = DenseUpdate(
        attn_out(model), (torch.randn(model.get_parameter(attn_out(model)).shape) * 0.05).bfloat16()
    )
    d = EditDelta.for_model(model, [u1, u2], method="rome", config={"layers": [1], "lr": 0.5}, requests=[req])
    d.save(tmp_path / "delta")
    return d, tmp_path / "delta"


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(bases, tmp_path, family):
    model = bases(family)
    d, path = _saved_delta(model, tmp_path)
    assert (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()
    keys = set(load_file(str(path / WEIGHTS_NAME)))
    assert keys == {f"{d.updates[0].param}.a", f"{d.updates[0].param}.b", f"{d.updates[1].param}.delta"}
    loaded = load_delta(path)
    assert loaded.method == "rome" and loaded.config == d.config and loaded.requests == d.requests
    assert loaded.requests[0]["target_new"] == "Rome"
    assert loaded.meta == d.meta and loaded.fingerprints == d.fingerprints
    assert loaded.meta["model_type"] == family
    for a, b in zip(d.updates, loaded.updates):
        assert type(a) is type(b) and a.param == b.param
        for k, t in a.tensors().items():
            assert torch.equal(t, b.tensors()[k]) and t.dtype == b.tensors()[k].dtype
    m1, m2 = bases(family), bases(family)
    d.apply(m1)
    loaded.apply(m2)
    assert same_as(m2, snapshot(m1))
    summary = loaded.summary()
    assert summary["n_requests"] == 1 and summary["method"] == "rome"
    assert [p["kind"] for p in summary["params"]] == ["low_rank", "dense"]
    assert summary["params"][0]["rank"] == 2
    assert summary["params"][0]["norm"] == pytest.approx(d.updates[0].norm())
    assert summary["params"][1]["dtype"] == "bfloat16"
    json.dumps(summary)


def test_load_errors_name_the_file(bases, tmp_path):
    model = bases("gpt2")
    d, path = _saved_delta(model, tmp_path)
    weights, cfg = path / WEIGHTS_NAME, path / CONFIG_NAME
    good_cfg = cfg.read_text()
    good_weights = weights.read_bytes()

    weights.unlink()
    with pytest.raises(DeltaFormatError, match=WEIGHTS_NAME + ".*missing"):
        load_delta(path)

    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DeltaFormatError, match=WEIGHTS_NAME):
        load_delta(path)

    weights.write_bytes(good_weights[: len(good_weights) // 2])  # truncated
    with pytest.raises(DeltaFormatError, match=WEIGHTS_NAME):
        load_delta(path)

    weights.write_bytes(good_weights)
    tensors = load_file(str(weights))
    missing_key = f"{d.updates[0].param}.b"
    del tensors[missing_key]
    save_file(tensors, str(weights), metadata={"format": "kedit-edit-delta", "format_version": "1"})
    with pytest.raises(DeltaFormatError, match=rf"missing tensor '{missing_key}'"):
        load_delta(path)

    weights.write_bytes(good_weights)
    cfg.write_text("{not json")
    with pytest.raises(DeltaFormatError, match=CONFIG_NAME):
        load_delta(path)

    data = json.loads(good_cfg)
    data["format_version"] = 99
    cfg.write_text(json.dumps(data))
    with pytest.raises(DeltaFormatError, match="format_version 99"):
        load_delta(path)

    data = json.loads(good_cfg)
    data["updates"][0]["shape"] = [1, 1]
    cfg.write_text(json.dumps(data))
    with pytest.raises(DeltaFormatError, match="shape"):
        load_delta(path)

    cfg.write_text(good_cfg)
    assert load_delta(path).params == d.params  # intact again


def test_summary_and_norms(bases):
    model = bases("llama")
    _, _, u = lowrank(model, mlp_out(model), rank=4)
    d = EditDelta.for_model(model, [u], method="memit", requests=[{"prompt": "a {}", "subject": "b"}])
    s = d.summary()
    assert s["params"][0]["shape"] == list(model.get_parameter(u.param).shape)
    assert s["params"][0]["fingerprint"] == tensor_fingerprint(model.get_parameter(u.param))
    assert s["params"][0]["rank"] == 4 and s["n_requests"] == 1 and s["applied"] is False
    assert s["params"][0]["norm"] == pytest.approx(float(torch.linalg.norm(u.dense().double())), rel=1e-5)
