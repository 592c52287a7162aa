"""The method registry: each method registers itself with one call, nothing else branches on method names.

    register_method(
        "rome", config=ROMEConfig, compute=compute_rome,
        paper="Meng et al., Locating and Editing Factual Associations in GPT, NeurIPS 2022",
    )

``compute(model, tok, requests, config, ctx) -> EditDelta`` must leave the model bit-identical.
Configs are dataclasses of numbers/flags; per-architecture defaults come from :meth:`MethodSpec.default_config`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MethodSpec", "register_method", "get_method", "list_methods", "UnknownMethodError", "ConfigError"]


class UnknownMethodError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class ConfigError(ValueError):
    """A method configuration has unknown keys or values of the wrong type."""


@dataclass(frozen=True)
class MethodSpec:
    """Everything kedit knows about one editing method."""

    name: str
    config: type
    compute: Callable[..., Any]
    paper: str
    summary: str = ""
    #: ``fn(model) -> dict`` of config overrides for this model (architecture presets; numbers only)
    presets: Callable[[Any], Mapping[str, Any]] | None = None
    #: edits of this method can be merged into the weights (plain additive deltas)
    mergeable: bool = True
    #: how rollback works: "exact" (LIFO restore of saved originals)
    rollback: str = "exact (LIFO)"
    #: a batch of requests is computed jointly (True) or one after another inside compute (False)
    batched: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)

    def default_config(self, model: Any = None) -> Any:
        """The config for ``model``: dataclass defaults overlaid with the architecture preset."""
        overrides = dict(self.presets(model)) if (self.presets is not None and model is not None) else {}
        return self.make_config(overrides)

    def make_config(self, values: Mapping[str, Any] | None = None, base: Any = None) -> Any:
        """Build a config from ``values`` (unknown keys rejected), starting from ``base`` or the defaults."""
        values = dict(values or {})
        names = {f.name for f in dataclasses.fields(self.config)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"{self.name}: unknown config keys {unknown}; known: {sorted(names)}")
        start = base if base is not None else self.config()
        fixed = {}
        for f in dataclasses.fields(self.config):
            if f.name in values:
                cur = getattr(start, f.name)
                v = values[f.name]
                if isinstance(v, list) and (isinstance(cur, tuple) or cur is None):
                    v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
                if isinstance(cur, float) and isinstance(v, int) and not isinstance(v, bool):
                    v = float(v)
                fixed[f.name] = v
        return dataclasses.replace(start, **fixed)


_METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    *,
    config: type,
    compute: Callable[..., Any],
    paper: str,
    **kw: Any,
) -> MethodSpec:
    """Register a method under a lowercase ``name`` (dashes allowed). Re-registering a name is an error."""
    if name != name.lower() or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"method names are lowercase alphanumerics with - or _: {name!r}")
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"{name}: config must be a dataclass")
    if name in _METHODS and _METHODS[name].compute is not compute:
        raise ValueError(f"method {name!r} is already registered")
    spec = MethodSpec(name=name, config=config, compute=compute, paper=paper, **kw)
    _METHODS[name] = spec
    return spec


def _load_builtin() -> None:
    # importing the package registers every built-in method (each module calls register_method once)
    import kedit.methods  # noqa: F401


def get_method(name: str) -> MethodSpec:
    _load_builtin()
    key = name.lower()
    if key not in _METHODS:
        raise UnknownMethodError(f"unknown method {name!r}; registered: {', '.join(sorted(_METHODS))}")
    return _METHODS[key]


def list_methods() -> list[MethodSpec]:
    _load_builtin()
    return [_METHODS[k] for k in sorted(_METHODS)]
