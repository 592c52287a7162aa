"""Per-architecture default numbers for each method, kept as package data (``<method>.json``).

Each file holds ``{"presets": [{"name": ..., "match": {config_attr: value, ...}, "config": {...}}, ...]}``; the
first entry whose ``match`` equals the model's config attributes wins (``model_type``, ``num_hidden_layers``,
``hidden_size`` ...). Presets are numbers only -- never module paths: those live in :mod:`kedit.arch`.
A file may also carry ``"testbed_efficacy"``: the rates its methods measured on the testbed models, from which
``tests/methods/test_efficacy.py`` derives its floors (see docs/efficacy.md); it is not read at edit time.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

__all__ = ["preset_for", "load_presets"]


def load_presets(method: str) -> list[dict[str, Any]]:
    path = resources.files(__name__).joinpath(f"{method}.json")
    if not path.is_file():
        return []
    return list(json.loads(path.read_text(encoding="utf-8"))["presets"])


def _attr(config: Any, key: str) -> Any:
    return getattr(config, key, None)


def preset_for(method: str, model: Any) -> dict[str, Any]:
    """Config overrides for ``model`` (empty when no preset matches)."""
    config = getattr(model, "config", model)
    for entry in load_presets(method):
        if all(_attr(config, k) == v for k, v in entry.get("match", {}).items()):
            return dict(entry.get("config", {}))
    return {}
