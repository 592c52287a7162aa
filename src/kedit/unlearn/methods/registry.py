"""The unlearning-method registry: each method module registers its Trainer class with one call.

    register_unlearn_method("npo", NPOTrainer, paper="Zhang et al., ... 2024", defaults={"beta": 0.1})
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["UnlearnMethodSpec", "get_unlearn_method", "list_unlearn_methods", "register_unlearn_method"]


@dataclass(frozen=True)
class UnlearnMethodSpec:
    name: str
    trainer: type
    paper: str
    summary: str = ""
    #: config overrides of this method (on top of :class:`~kedit.unlearn.methods.base.UnlearnConfig`'s defaults)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    #: the method can train LoRA adapters instead of the full weights
    lora: bool = True


_REGISTRY: dict[str, UnlearnMethodSpec] = {}


def register_unlearn_method(name: str, trainer: type, *, paper: str, summary: str = "", **kw: Any) -> None:
    _REGISTRY[name] = UnlearnMethodSpec(name, trainer, paper, summary, **kw)


def _load_builtin() -> None:
    from . import grad_ascent, grad_diff, memflex, npo, rkld, rmu, simnpo  # noqa: F401  (each registers itself)


def get_unlearn_method(name: str) -> UnlearnMethodSpec:
    _load_builtin()
    key = name.lower().replace("-", "_")
    aliases = {"ga": "grad_ascent", "gradascent": "grad_ascent", "gd": "grad_diff", "graddiff": "grad_diff"}
    key = aliases.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(f"unknown unlearning method {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def list_unlearn_methods() -> list[UnlearnMethodSpec]:
    _load_builtin()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]
