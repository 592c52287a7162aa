"""kedit: edit, unlearn, audit and serve the knowledge inside large language models.

Public API (imported lazily, so ``import kedit`` stays cheap and has no side effects)::

    model, tok = kedit.load_model("testbed-gpt2")
    result = kedit.edit(model, tok, [kedit.EditRequest("{} was born in", "Varnel Okasti", "Tolmarin")])
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "EditRequest": "kedit.requests",
    "Probe": "kedit.requests",
    "RequestError": "kedit.requests",
    "EditDelta": "kedit.deltas",
    "load_delta": "kedit.deltas",
    "EditContext": "kedit.core.context",
    "StatsCache": "kedit.core.stats",
    "edit": "kedit.api",
    "load_model": "kedit.api",
    "EditResult": "kedit.api",
    "get_method": "kedit.methods.registry",
    "list_methods": "kedit.methods.registry",
    "register_method": "kedit.methods.registry",
    "get_adapter": "kedit.arch",
    "register_adapter": "kedit.arch",
    "trace": "kedit.hooks",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kedit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
