"""Efficacy of every editing method on the embedded testbed models, batch size 1 (each request edits the unedited
model; the delta is reverted bit-exactly before the next one): the new target becomes the greedy answer.

Requests are the held-out slice ``testbed:100-150`` -- the testbed presets were tuned on the first 20 requests
(the v* steps and weight decay of the Llama ROME/MEMIT/AlphaEdit/EMMET presets on the first 100).
The full sweep (50 requests, every method, both models) is marked ``slow`` (``pytest -m slow``); CI runs the first
8 of those requests for a representative subset. Floors sit a little below the measured rates (the table is in
docs/efficacy.md, produced by ``python benchmarks/efficacy.py``); where a method misses the 90 % target of the
locate-then-edit issue the floor is a regression floor and docs/efficacy.md says why (mostly company subjects on
testbed-llama, whose last token is a generic suffix) -- it is reported, not hidden.
"""

from __future__ import annotations

import pytest
import torch

from kedit.api import edit
from kedit.core.context import EditContext
from kedit.testbed import edit_requests, load_testbed_model, load_world

HELD_OUT = (100, 150)

#: floors on the 50-request rate (measured rate in docs/efficacy.md)
FULL_FLOOR = {  # measured gpt2 / llama, testbed generator 1.2.0 (docs/efficacy.md): the floor sits 6 points below
    ("ft-l", "gpt2"): 0.56, ("ft-l", "llama"): 0.6,  # 62 % / 66 %
    ("ft-m", "gpt2"): 0.95, ("ft-m", "llama"): 0.95,  # 100 / 100
    ("lora", "gpt2"): 0.95, ("lora", "llama"): 0.95,  # 100 / 100
    ("rome", "gpt2"): 0.86, ("rome", "llama"): 0.88,  # 92 / 94
    ("r-rome", "gpt2"): 0.88, ("r-rome", "llama"): 0.84,  # 94 / 90
    ("memit", "gpt2"): 0.92, ("memit", "llama"): 0.86,  # 98 / 92
    ("pmet", "gpt2"): 0.86, ("pmet", "llama"): 0.64,  # 92 / 70
    ("alphaedit", "gpt2"): 0.92, ("alphaedit", "llama"): 0.84,  # 98 / 90
    ("emmet", "gpt2"): 0.92, ("emmet", "llama"): 0.86,  # 98 / 92
    ("memit-blue", "gpt2"): 0.92, ("memit-blue", "llama"): 0.92,  # 98 / 98
    ("pmet-blue", "gpt2"): 0.82, ("pmet-blue", "llama"): 0.76,  # 88 / 82
    ("alphaedit-blue", "gpt2"): 0.9, ("alphaedit-blue", "llama"): 0.92,  # 96 / 98
    ("kn", "gpt2"): 0.48, ("kn", "llama"): 0.32,  # 54 / 38
}

#: the foundation issue's done-criterion (ROME takes >= 90 % of 50 requests on both testbed models), asserted on
#: the full 50 on top of the regression floor; the CI subset keeps the regression floor's tolerance
TARGET = {("rome", "gpt2"): 0.9, ("rome", "llama"): 0.9}

#: the CI subset: 8 requests each
CI_CASES = [
    ("ft-m", "gpt2"), ("lora", "gpt2"), ("rome", "gpt2"), ("memit", "gpt2"), ("alphaedit", "gpt2"),
    ("emmet", "gpt2"), ("memit-blue", "gpt2"), ("rome", "llama"), ("memit", "llama"), ("ft-m", "llama"),
]


@pytest.fixture(scope="module")
def requests():
    a, b = HELD_OUT
    return edit_requests(load_world(), n=b)[a:b]


_MODELS: dict[str, tuple] = {}


def _model(arch: str):
    if arch not in _MODELS:
        _MODELS[arch] = load_testbed_model(arch)
    return _MODELS[arch]


def _success_rate(method: str, arch: str, reqs) -> float:
    model, tok = _model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = EditContext()
    successes: list[bool] = []
    for req in reqs:
        result = edit(model, tok, [req], method=method, ctx=ctx)
        successes.extend(result.success)
        result.revert(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "revert was not exact"
    return sum(successes) / len(successes)


@pytest.mark.parametrize(("method", "arch"), CI_CASES, ids=[f"{m}-{a}" for m, a in CI_CASES])
def test_efficacy_ci_subset(method, arch, requests):
    rate = _success_rate(method, arch, requests[:8])
    # 8 requests: one miss more than the 50-request floor allows is tolerated
    assert rate >= FULL_FLOOR[(method, arch)] - 0.125, f"{method} success {rate:.0%} on testbed-{arch} (8 requests)"


@pytest.mark.slow
@pytest.mark.parametrize(("method", "arch"), sorted(FULL_FLOOR), ids=[f"{m}-{a}" for m, a in sorted(FULL_FLOOR)])
def test_efficacy_full(method, arch, requests):
    rate = _success_rate(method, arch, requests)
    floor = max(FULL_FLOOR[(method, arch)], TARGET.get((method, arch), 0.0))
    assert rate >= floor, f"{method} success {rate:.0%} on testbed-{arch} (50 requests, floor {floor:.0%})"
