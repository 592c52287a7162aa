"""The method × architecture case table: every registered method (``list_methods()``, so new methods join
automatically) on every tiny architecture must

1. leave the model bit-identical in ``compute`` (all tensors, ``requires_grad`` flags, module types, train/eval);
2. apply → revert bitwise exactly, touching only the delta's parameters;
3. survive save → load with identical tensors, and the loaded delta must change the same weights identically;
4. raise the teacher-forced log-probability of ``target_new`` after the prompt.

Each method runs with a tiny configuration: ``FAST[name]`` if present, else the entries of ``GENERIC_FAST`` that
its config has (few optimisation steps, small statistics). A shared :class:`EditContext` per architecture carries
injected templates and a tiny statistics corpus, as in ``test_rome.py``.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from kedit.core.batching import ConflictingRequestsError
from kedit.core.context import EditContext
from kedit.deltas import load_delta
from kedit.memory import edit_ids
from kedit.methods.ft.objective import teacher_forced_logprob
from kedit.methods.registry import list_methods
from kedit.requests import EditRequest
from kedit.testing import TINY_TEXT, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")

ARCHS = ("gpt2", "gptj", "llama", "qwen2")
TEMPLATES = ["{}", "Paris is a city. {}", "Because of that. {}"]
CORPUS = [s.strip() + "." for s in TINY_TEXT.split(".") if s.strip()] * 6
#: the subject ends the prompt, so a change at the subject's last token acts directly on the predicting position:
#: random tiny models route little information between positions, which would drown every method's effect
REQ = EditRequest("The capital of {}", "Germany", "Paris", target_true="Berlin", case_id="table")

_LTE = {"layers": (1, 2), "v_steps": 6, "mom2_n_tokens": 600}
#: λ is "the number of preserved keys" (METHODS.md §3): the paper's 10⁴ swamps a 600-token statistics sample
_LAM = {"mom2_update_weight": 50.0}
#: tiny configurations per method (few steps, small statistics)
FAST: dict[str, dict] = {
    "rome": {"layer": 1, "v_steps": 6, "mom2_n_tokens": 600},
    "r-rome": {"layer": 1, "v_steps": 6, "mom2_n_tokens": 600},
    "memit": {**_LTE, **_LAM},
    "memit-blue": {**_LTE, **_LAM},
    "pmet": {**_LTE, **_LAM},
    "pmet-blue": {**_LTE, **_LAM},
    # the absolute τ = 2e-2 of the paper is scale-specific (METHODS.md §6): on tiny statistics use a relative one
    "alphaedit": {**_LTE, "nullspace_mode": "relative", "nullspace_threshold": 0.05, "l2": 0.5},
    "alphaedit-blue": {**_LTE, "nullspace_mode": "relative", "nullspace_threshold": 0.05, "l2": 0.5},
    "emmet": {**_LTE, **_LAM},
    "ft-l": {"layers": (1,), "lr": 1e-2, "epochs": 4},
    "ft-m": {"layers": (1,), "lr": 1e-2, "epochs": 4},
    "lora": {"layers": (1, 2), "rank": 2, "epochs": 4},
    "kn": {"layers": (1, 2, 3), "steps": 2, "batch_size": 64},
}
#: used for methods without a FAST entry (only the keys their config has)
GENERIC_FAST = {"v_steps": 6, "mom2_n_tokens": 600, "epochs": 4, "num_steps": 4, "n_iter": 4}

#: (method, arch) -> reason, for pairs whose efficacy on a *random* tiny model is not expected; the structural
#: invariants are still asserted and only the efficacy check xfails. Empty today: with REQ (subject last) every
#: method raises the target, KN included (whose input-embedding edit is not guaranteed to, METHODS.md §12).
WEAK_EFFICACY: dict[tuple[str, str], str] = {}


def _config(spec):
    names = {f.name for f in dataclasses.fields(spec.config)}
    overrides = FAST.get(spec.name)
    if overrides is None:
        overrides = {k: v for k, v in GENERIC_FAST.items() if k in names}
    return spec.make_config(overrides)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


_CTX: dict[str, EditContext] = {}


def _ctx(arch: str) -> EditContext:
    # one context per architecture: it keys its statistics by the first model it sees
    if arch not in _CTX:
        _CTX[arch] = EditContext(corpus=CORPUS, corpus_id="tiny", templates=TEMPLATES)
    return _CTX[arch]


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        {n: type(m).__name__ for n, m in model.named_modules()},
        model.training,
    )


def _assert_same(model, snap, what: str) -> None:
    tensors, flags, modules, training = snap
    now = model.state_dict()
    assert set(now) == set(tensors), f"{what}: the set of tensors changed"
    diff = [k for k, v in now.items() if not torch.equal(tensors[k], v)]
    assert not diff, f"{what}: tensors changed: {diff[:5]}"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags, (
        f"{what}: requires_grad changed"
    )
    assert {n: type(m).__name__ for n, m in model.named_modules()} == modules, f"{what}: modules replaced"
    assert model.training == training, f"{what}: train/eval mode changed"


@torch.no_grad()
def _logits(model, tok) -> torch.Tensor:
    ids = torch.tensor([tok(REQ.prompt.format(REQ.subject) + " " + REQ.target_new)["input_ids"]])
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


# every method kedit ships (methods that other test modules register for their own purposes are not kedit's)
METHOD_NAMES = [spec.name for spec in list_methods() if spec.compute.__module__.startswith("kedit.methods")]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_case(name, arch, tok, tmp_path):
    spec = next(s for s in list_methods() if s.name == name)
    model = tiny_model(arch, vocab_size=len(tok))
    cfg = _config(spec)
    snap = _snapshot(model)
    lp_before = teacher_forced_logprob(model, tok, REQ)

    # 1. compute never mutates the model
    delta = spec.compute(model, tok, [REQ], cfg, _ctx(arch))
    _assert_same(model, snap, "compute")
    assert delta.updates, "an edit must change something"

    # 2. apply -> revert is bitwise exact and touches only the delta's parameters
    delta.apply(model)
    try:
        applied = {k: v.clone() for k, v in model.state_dict().items()}
        changed = {k for k, v in applied.items() if not torch.equal(snap[0][k], v)}
        if delta.is_memory:  # a memory method (GRACE, WISE) leaves every weight alone and adds side-memory entries
            assert not changed, f"a memory edit changed weights: {sorted(changed)}"
            assert set(edit_ids(model)) >= {u.edit_id for u in delta.updates}
        else:
            assert changed and changed <= set(delta.params), f"changed {sorted(changed)} vs delta {delta.params}"
        logits_applied = _logits(model, tok)
        lp_after = teacher_forced_logprob(model, tok, REQ)
    finally:
        delta.revert(model)
    _assert_same(model, snap, "revert")
    assert not edit_ids(model), "revert left side-memory entries behind"

    # 3. save -> load: identical tensors and the same effect on the weights
    delta.save(tmp_path / "delta")
    loaded = load_delta(tmp_path / "delta")
    assert loaded.method == delta.method and loaded.params == delta.params
    for u, v in zip(delta.updates, loaded.updates):
        assert u.kind == v.kind and u.shape == v.shape
        for key, t in u.tensors().items():
            assert torch.equal(t.detach().cpu(), v.tensors()[key]), f"{u.param}.{key} changed on disk"
    with loaded.applied(model):
        now = model.state_dict()
        assert all(torch.equal(applied[k], now[k]) for k in applied), "loaded delta applies differently"
        assert torch.equal(_logits(model, tok), logits_applied), "loaded delta changes the outputs differently"
    _assert_same(model, snap, "revert of the loaded delta")

    # 4. efficacy: the target's teacher-forced log-probability rises
    if lp_after <= lp_before and (name, arch) in WEAK_EFFICACY:
        pytest.xfail(WEAK_EFFICACY[(name, arch)])
    assert lp_after > lp_before, f"log P(target) did not rise: {lp_before:.4f} -> {lp_after:.4f}"


#: methods that compute a batch jointly (``MethodSpec.batched``); sequential ones (ROME) may override a request
BATCHED = [name for name in METHOD_NAMES if next(s for s in list_methods() if s.name == name).batched]


@pytest.mark.parametrize("name", BATCHED)
def test_contradicting_requests_refused(name, tok):
    """Two requests with the same subject and prompt but different targets cannot both succeed in one joint
    computation: every batched method refuses them, naming both records, before changing anything."""
    spec = next(s for s in list_methods() if s.name == name)
    model = tiny_model("gpt2", vocab_size=len(tok))
    snap = _snapshot(model)
    other = EditRequest("{} is known for", "Toko Yasuda", "trumpet", case_id="other")
    clash = EditRequest(REQ.prompt, REQ.subject, "Rome", case_id="clash")
    with pytest.raises(ConflictingRequestsError) as err:
        spec.compute(model, tok, [REQ, other, clash], _config(spec), _ctx("gpt2"))
    msg = str(err.value)
    assert "case 'table'" in msg and "case 'clash'" in msg and "'Paris'" in msg and "'Rome'" in msg
    assert "case 'other'" not in msg
    # without case ids the records are named by their 1-based position
    anonymous = [dataclasses.replace(r, case_id=None) for r in (REQ, other, clash)]
    with pytest.raises(ConflictingRequestsError, match=r"request 1 \(1-based position\) and request 3 "):
        spec.compute(model, tok, anonymous, _config(spec), _ctx("gpt2"))
    _assert_same(model, snap, "a refused compute")
