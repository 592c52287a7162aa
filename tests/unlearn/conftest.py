"""Shared fixtures of the unlearning tests: the committed testbed GPT-2 and a small forget01 split (its retain set cut
to 24 items so a training step stays fast)."""

from __future__ import annotations

import pytest

from kedit.testbed import load_testbed_model
from kedit.unlearn.splits import UnlearnSplit
from kedit.unlearn.splits import testbed_split as make_split


@pytest.fixture(scope="module")
def gpt2():
    return load_testbed_model("gpt2")


@pytest.fixture(scope="module")
def split():
    sp = make_split("forget01")
    return UnlearnSplit(sp.name, sp.forget, sp.retain[:24], sp.extra, sp.holdout, sp.forget_subjects, sp.info)
