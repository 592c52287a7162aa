"""Fixtures of the method tests: the committed testbed models (module-scoped: loading takes a second) and 20
testbed requests."""

from __future__ import annotations

import pytest

from kedit.testbed import edit_requests, load_testbed_model


@pytest.fixture(scope="module")
def gpt2():
    return load_testbed_model("gpt2")


@pytest.fixture(scope="module")
def llama():
    return load_testbed_model("llama")


@pytest.fixture(scope="module")
def reqs():
    return edit_requests(n=20)
