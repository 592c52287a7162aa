"""ROME efficacy on the embedded testbed models: counterfactual edits take (the new target becomes the greedy
answer) for at least 90 % of 50 held-out requests on both architectures."""

from __future__ import annotations

import pytest

from kedit.api import edit
from kedit.core.context import EditContext
from kedit.testbed import edit_requests, load_testbed_model, load_world


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rome_takes_on_testbed(arch):
    model, tok = load_testbed_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    requests = edit_requests(load_world(), n=50)
    assert len(requests) == 50
    # single-edit protocol: each request edits the unedited model
    ctx = EditContext()
    successes = []
    for req in requests:
        result = edit(model, tok, [req], method="rome", ctx=ctx)
        successes.extend(result.success)
        result.revert(model)
    rate = sum(successes) / len(successes)
    assert rate >= 0.9, f"ROME success {rate:.0%} on testbed-{arch}"
    assert all(torch_equal(before[k], v) for k, v in model.state_dict().items())


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)
