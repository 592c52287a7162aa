"""Shared test setup: offline Hugging Face, quiet tokenizers, deterministic torch threads."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

# tiny models: one intra-op thread is faster than two (and immune to oversubscription)
torch.set_num_threads(1)


import pytest


@pytest.fixture(autouse=True, scope="session")
def _kedit_cache(tmp_path_factory):
    """The command line keeps statistics in kedit's default cache: point it at a temporary directory, never at the
    real ``~/.cache/kedit``."""
    old = os.environ.get("KEDIT_CACHE")
    os.environ["KEDIT_CACHE"] = str(tmp_path_factory.mktemp("kedit-cache"))
    yield
    if old is None:
        os.environ.pop("KEDIT_CACHE", None)
    else:
        os.environ["KEDIT_CACHE"] = old
