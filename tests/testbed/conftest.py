"""Fixtures of the testbed tests: a session-scoped micro testbed build (≈ 1 minute on 2 cores, built once)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest


@pytest.fixture(scope="session")
def micro_testbed(tmp_path_factory):
    """Path of a micro testbed build (world.json, gpt2/, llama/, manifest.json).

    Set ``KEDIT_MICRO_TESTBED_DIR`` to a directory to reuse a build across sessions (it is rebuilt when its
    manifest does not match the generator version or the files)."""
    from kedit.testbed import build_micro_testbed

    where = os.environ.get("KEDIT_MICRO_TESTBED_DIR")
    out = where if where else tmp_path_factory.mktemp("micro_testbed")
    return build_micro_testbed(out)
