"""Devices and dtypes: every registered method end to end on tiny random models.

* CPU (CI): each method in bfloat16 and float16 (the edit runs, the deltas are finite, on the parameter's
  device and in the dtype they are added in, the applied weights keep the parameter's dtype, revert is bitwise),
  fp64 models with fp32 statistics, and statistics whose every use must first move them to the parameter's device.
* ``@pytest.mark.gpu`` (skipped without CUDA): the same on CUDA in fp32 / fp16 / bf16, plus an ``EditContext``
  whose statistics were computed on the CPU copy of the model reused for the CUDA model.
  Run them with ``python -m pytest -m gpu tests/test_devices.py``.
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import kedit
from kedit.core.context import EditContext
from kedit.core.stats import SecondMoment, StatsCache
from kedit.deltas.ledger import compute_dtype
from kedit.methods.registry import list_methods
from kedit.requests import EditRequest
from kedit.testing import TINY_TEXT, tiny_model, tiny_tokenizer

CORPUS = [s.strip() + "." for s in TINY_TEXT.split(".") if s.strip()] * 6
TEMPLATES = ["{}", "Paris is a city. {}"]
REQS = [
    EditRequest("{} plays the", "Toko Yasuda", "trumpet", case_id="a"),
    EditRequest("The capital of {} is", "France", "Berlin", case_id="b"),
]
N_TOKENS = 400

#: kedit's own methods (a plugin registered by another package is not ours to test here)
METHODS = sorted(s.name for s in list_methods() if s.compute.__module__.startswith("kedit.methods"))

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def small_config(name: str) -> dict:
    """Few steps, few layers, small statistics -- chosen by field name, so a new method gets one too."""
    spec = next(s for s in list_methods() if s.name == name)
    fields = {f.name for f in dataclasses.fields(spec.config)}
    wanted = {
        "layers": (1, 2),
        "layer": 1,
        "v_steps": 3,
        "mom2_n_tokens": N_TOKENS,
        "epochs": 2,
        "steps": 2,
        "batch_size": 8,
        "rank": 2,
        "nullspace_mode": "relative",
        "nullspace_threshold": 0.05,
    }
    cfg = {k: v for k, v in wanted.items() if k in fields}
    if name == "emmet":
        cfg["layers"] = (1,)
    if name in ("ft-l", "ft-m"):
        cfg.update(lr=1e-2, batch_size=None)
    if name == "lora":
        cfg.update(layers=(1,), batch_size=None)
    if name == "kn":
        cfg.update(batch_size=4)
    return cfg


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def new_ctx() -> EditContext:
    return EditContext(corpus=CORPUS, corpus_id="tiny-devices", templates=TEMPLATES)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(model, before) -> None:
    now = model.state_dict()
    for k, v in before.items():
        assert now[k].dtype == v.dtype and now[k].device == v.device, k
        assert torch.equal(now[k], v), f"{k} differs after revert"


def edit_and_check(model, tok, method: str, ctx: EditContext | None = None):
    """Edit with ``method``, check the applied deltas, revert, check the model is bitwise back."""
    before = snapshot(model)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    result = kedit.edit(model, tok, REQS, method, config=small_config(method), ctx=ctx or new_ctx(), evaluate=False)
    assert result.deltas and not result.errors
    for delta in result.deltas:
        assert delta.is_applied
        if delta.is_memory:  # side memory (GRACE): the weights stay, the entries live in kedit.memory
            from kedit.memory import get_memory

            assert get_memory(model) and all(u.is_finite() for u in delta.updates)
            continue
        for u in delta.updates:
            p = model.get_parameter(u.param)
            assert p.dtype == dtypes[u.param], f"{method}: {u.param} changed dtype to {p.dtype}"
            assert bool(torch.isfinite(p).all()), f"{method}: {u.param} has non-finite weights"
            assert u.is_finite()
            for name, t in u.tensors().items():
                assert t.device == p.device, f"{method}: {u.param}.{name} on {t.device}, weight on {p.device}"
                assert t.dtype == compute_dtype(p.dtype), f"{method}: {u.param}.{name} is {t.dtype}"
            assert delta.apply_report[u.param]["dtype"] == str(p.dtype).removeprefix("torch.")
            assert delta.apply_report[u.param]["status"] in ("ok", "partial", "zero")
        for t in delta.extras.values():
            assert bool(torch.isfinite(t).all())
    assert any(
        not torch.equal(before[n], model.state_dict()[n]) for d in result.deltas if not d.is_memory for n in d.params
    ) or all(d.is_memory for d in result.deltas), f"{method}: the edit changed nothing"
    result.revert(model)
    assert_same(model, before)
    return result


# -- CPU: half precision ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_every_method_in_half_precision_on_cpu(tok, method, dtype):
    arch = "gpt2" if METHODS.index(method) % 2 else "llama"
    model = tiny_model(arch, vocab_size=len(tok), dtype=dtype)
    edit_and_check(model, tok, method)


# -- CPU: statistics in another dtype than the model ------------------------------------------------------------
class _CastStats(StatsCache):
    """A cache whose second moments come back in ``dtype`` whatever was asked (as a file written in fp32 would)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.calls = 0

    def get(self, *args, **kw):
        self.calls += 1
        got = super().get(*args, **kw)
        return {l: SecondMoment(mean=sm.mean.to(self.dtype), count=sm.count) for l, sm in got.items()}


STATS_METHODS = ["rome", "memit", "pmet", "emmet", "alphaedit"]


@pytest.mark.parametrize("method", METHODS)
def test_fp64_model_with_fp32_statistics(tok, method):
    model = tiny_model("gpt2", vocab_size=len(tok), dtype=torch.float64)
    ctx = new_ctx()
    ctx.stats = _CastStats(torch.float32)
    result = edit_and_check(model, tok, method, ctx)
    if method in STATS_METHODS:
        assert ctx.stats.calls >= 1
    for u in result.deltas[0].updates:  # fp64 weights get fp64 factors: nothing rounded to fp32 on the way
        assert u.dtype == torch.float64


def test_fp32_model_with_fp64_statistics_matches_fp32_statistics(tok):
    """The solve runs in fp64 whatever the stored dtype: fp32- and fp64-stored C give (nearly) the same edit."""
    model = tiny_model("llama", vocab_size=len(tok))
    deltas = []
    for dt in (torch.float32, torch.float64):
        ctx = new_ctx()
        ctx.stats = _CastStats(dt)
        spec = next(s for s in list_methods() if s.name == "memit")
        deltas.append(spec.compute(model, tok, REQS, spec.make_config(small_config("memit")), ctx))
    for a, b in zip(deltas[0].updates, deltas[1].updates):
        da, db = a.dense(torch.float64), b.dense(torch.float64)
        assert float((da - db).norm()) <= 1e-3 * float(db.norm())


# -- CPU: the device path, without a second device --------------------------------------------------------------
class _Elsewhere(torch.Tensor):
    """A tensor that pretends to live on another device: anything but reading its metadata, changing its dtype or
    moving it (``.to(device)``, which returns a plain tensor and records the device) raises. Used as a cached
    second moment, it proves every consumer moves C to a device before computing with it."""

    moved_to: list[torch.device] = []

    _META = {"shape", "dtype", "device", "ndim", "size", "dim", "numel", "is_floating_point", "__repr__"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in ("__get__",):  # properties (shape, dtype, ...)
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        if name in cls._META:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if name in ("double", "float") or (name == "to" and _device_arg(args[1:], kwargs) is None):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs).as_subclass(cls)
        if name == "to":
            device = _device_arg(args[1:], kwargs)
            cls.moved_to.append(torch.device(device))
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs).as_subclass(torch.Tensor)
        raise AssertionError(f"a cached second moment was used by {name} before being moved to a device")


def _device_arg(args, kwargs):
    if "device" in kwargs:
        return kwargs["device"]
    for a in args:
        if isinstance(a, (torch.device, str)):
            return a
        if isinstance(a, torch.Tensor):
            return a.device
    return None


class _ElsewhereStats(StatsCache):
    def get(self, *args, **kw):
        got = super().get(*args, **kw)
        return {l: SecondMoment(mean=sm.mean.as_subclass(_Elsewhere), count=sm.count) for l, sm in got.items()}


def test_elsewhere_tensor_refuses_use_unless_moved():
    t = torch.eye(3).as_subclass(_Elsewhere)
    assert t.shape == (3, 3) and t.double().dtype == torch.float64
    with pytest.raises(AssertionError, match="before being moved"):
        t @ torch.eye(3)
    _Elsewhere.moved_to.clear()
    moved = t.to(torch.device("cpu"))
    assert type(moved) is torch.Tensor and _Elsewhere.moved_to == [torch.device("cpu")]
    assert torch.equal(moved @ torch.eye(3), torch.eye(3))


@pytest.mark.parametrize("method", STATS_METHODS + ["alphaedit-blue", "memit-blue"])
def test_cached_statistics_are_moved_to_the_parameter_device(tok, method):
    model = tiny_model("llama", vocab_size=len(tok))
    ctx = new_ctx()
    ctx.stats = _ElsewhereStats()
    _Elsewhere.moved_to.clear()
    edit_and_check(model, tok, method, ctx)
    device = next(model.parameters()).device
    assert _Elsewhere.moved_to, f"{method} never moved its statistics"
    assert all(d == device for d in _Elsewhere.moved_to), _Elsewhere.moved_to


# -- CUDA --------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_every_method_on_cuda(tok, method, dtype):
    arch = "gpt2" if METHODS.index(method) % 2 else "llama"
    model = tiny_model(arch, vocab_size=len(tok), dtype=dtype).to("cuda")
    result = edit_and_check(model, tok, method)
    for d in result.deltas:
        assert all(t.is_cuda for u in d.updates for t in u.tensors().values())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", METHODS)
def test_cpu_statistics_reused_on_cuda(tok, method):
    """An EditContext whose statistics (and templates, AlphaEdit bases) were made with the CPU model is reused for
    the same model on CUDA: the cache hits (same fingerprint) and the CPU-resident state is moved where needed."""
    cpu_model = tiny_model("llama", vocab_size=len(tok))
    ctx = new_ctx()
    edit_and_check(cpu_model, tok, method, ctx)
    n_cached = len(ctx.stats)
    model = cpu_model.to("cuda")
    result = edit_and_check(model, tok, method, ctx)
    assert len(ctx.stats) == n_cached  # nothing recomputed
    for d in result.deltas:
        assert all(t.is_cuda for u in d.updates for t in u.tensors().values())


@pytest.mark.gpu
@needs_cuda
def test_sequential_alphaedit_on_cuda_carries_keys(tok):
    """Two AlphaEdit batches on CUDA: the first delta's (CPU) keys enter the second solve, revert is exact."""
    model = tiny_model("gpt2", vocab_size=len(tok)).to("cuda")
    before = snapshot(model)
    ctx = new_ctx()
    cfg = small_config("alphaedit")
    r1 = kedit.edit(model, tok, REQS[:1], "alphaedit", config=cfg, ctx=ctx, evaluate=False)
    r2 = kedit.edit(model, tok, REQS[1:], "alphaedit", config=cfg, ctx=ctx, evaluate=False)
    assert r2.deltas[0].meta["alphaedit"]["previous_batches"] == 1
    r2.revert(model)
    r1.revert(model)
    assert_same(model, before)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
def test_sampled_templates_on_cuda(tok, method):
    """Context templates sampled on the CUDA model (a CPU generator, logits moved to the CPU), then the edit."""
    model = tiny_model("gpt2", vocab_size=len(tok)).to("cuda")
    ctx = EditContext(corpus=CORPUS, corpus_id="tiny-devices")
    cfg = {**small_config(method), "context_lengths": ((3, 2),)}
    before = snapshot(model)
    result = kedit.edit(model, tok, REQS, method, config=cfg, ctx=ctx, evaluate=False)
    assert all(t.is_cuda for d in result.deltas for u in d.updates for t in u.tensors().values())
    result.revert(model)
    assert_same(model, before)
