"""Shared fixtures for the kedit.data loader tests (real samples live in tests/data/)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_ROOT = Path(__file__).resolve().parents[2]
try:  # the package may not be installed in the test environment
    import kedit.data  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    sys.path.insert(0, str(_ROOT / "src"))

DATA = _ROOT / "tests" / "data"
SHARED = Path(os.environ.get("KEDIT_SHARED_DATA", "/work/shared/data"))


@pytest.fixture
def data_dir() -> Path:
    return DATA


@pytest.fixture
def malformed_dir() -> Path:
    return DATA / "malformed"
