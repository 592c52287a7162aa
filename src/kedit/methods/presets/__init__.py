"""Per-architecture default numbers for each method, kept as package data (``<method>.json``).

Each file holds ``{"presets": [{"name": ..., "match": {config_attr: value, ...}, "config": {...}}, ...]}``; the
first entry whose ``match`` equals the model's config attributes wins. Matches name more than the layer count
(``model_type``, ``num_hidden_layers``, ``hidden_size``, ``intermediate_size``, ``vocab_size`` ...): Llama-2-7B and
Llama-3-8B both have 32 layers of width 4096 and differ in ``intermediate_size`` (11008 / 14336) and
``vocab_size`` (32000 / 128256). Presets are numbers only -- never module paths: those live in :mod:`kedit.arch`.
An entry may carry ``"statistics"``: where its ``mom2_n_tokens`` comes from (the papers count 100,000 Wikipedia
*texts*, about 10⁸ tokens); it is documentation, not read at edit time.

A file may also carry ``"testbed_efficacy"``: the rates its methods measured on the testbed models, from which
``tests/methods/test_efficacy.py`` derives its floors (see docs/efficacy.md); it is not read at edit time.

:func:`preset_entry_for` is the one look-up every method uses (directly, through :func:`preset_for`, or through
:func:`kedit.methods.blue.preset_overrides` for the MEMIT family's residual strategies).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

__all__ = ["load_presets", "preset_entry_for", "preset_for", "preset_name_for"]


def load_presets(method: str) -> list[dict[str, Any]]:
    path = resources.files(__name__).joinpath(f"{method}.json")
    if not path.is_file():
        return []
    return list(json.loads(path.read_text(encoding="utf-8"))["presets"])


def _matches(config: Any, match: dict[str, Any]) -> bool:
    return all(getattr(config, k, None) == v for k, v in match.items())


def preset_entry_for(method: str, model: Any, *, strategy: str = "spread") -> dict[str, Any] | None:
    """The first preset entry of ``method`` (``name``, ``match``, ``config``) matching ``model`` -- a model, or its
    ``transformers`` config -- among the entries of residual ``strategy`` (an entry's ``config["strategy"]``,
    ``"spread"`` when absent); ``None`` when none matches."""
    config = getattr(model, "config", model)
    for entry in load_presets(method):
        if entry.get("config", {}).get("strategy", "spread") != strategy:
            continue
        if _matches(config, entry.get("match", {})):
            return entry
    return None


def preset_name_for(method: str, model: Any, *, strategy: str = "spread") -> str | None:
    """Name of the preset :func:`preset_entry_for` selects (``None`` when none matches)."""
    entry = preset_entry_for(method, model, strategy=strategy)
    return None if entry is None else str(entry.get("name"))


def preset_for(method: str, model: Any, *, strategy: str = "spread") -> dict[str, Any]:
    """Config overrides for ``model`` (empty when no preset matches); ``layers`` lists become tuples."""
    entry = preset_entry_for(method, model, strategy=strategy)
    cfg = dict(entry.get("config", {})) if entry is not None else {}
    if isinstance(cfg.get("layers"), list):
        cfg["layers"] = tuple(cfg["layers"])
    return cfg
