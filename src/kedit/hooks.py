"""Tracing: read or edit the inputs/outputs of any module during a forward pass.

One context manager, :func:`trace`, in the spirit of ROME's ``nethook.TraceDict`` (Meng et al., 2022), written
for kedit::

    with trace(model, [p_in, p_out], retain_input=True, stop=True) as tr:
        model(**batch)                      # stops right after the last traced module ran
    keys = tr[p_in].input                   # [batch, seq, d_k]

* Modules are given as dotted paths (resolved with ``model.get_submodule``) or as ``(name, module)`` pairs.
* ``edit_output(name, output) -> output`` may replace a module's primary output (the first element when a
  module returns a tuple -- decoder blocks do in some transformers versions, not in others; :func:`primary`
  handles both).
* ``stop=True`` aborts the forward pass once every traced module has produced its output; the resulting
  :class:`StopForward` is swallowed by the context manager.
* Hooks are removed in ``__exit__`` whatever happens inside the block, and nothing is stored on the modules.
* Inputs passed as keyword arguments (``hidden_states=...``) are seen too (hooks are registered ``with_kwargs``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["trace", "Trace", "Record", "StopForward", "primary"]

EditFn = Callable[[str, torch.Tensor], "torch.Tensor | None"]


class StopForward(Exception):
    """Raised inside a forward pass to stop it early (swallowed by :func:`trace`)."""


def primary(value: Any) -> torch.Tensor:
    """The primary tensor of a module input/output (first element of a tuple/list, or the tensor itself)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if hasattr(value, "last_hidden_state"):
        return value.last_hidden_state
    raise TypeError(f"cannot find the primary tensor in a {type(value).__name__}")


def _replace_primary(value: Any, new: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return new
    if isinstance(value, tuple):
        return (new, *value[1:])
    if isinstance(value, list):
        return [new, *value[1:]]
    raise TypeError(f"cannot replace the primary tensor in a {type(value).__name__}")


@dataclass
class Record:
    """What was retained for one module: ``input`` (first positional/``hidden_states`` input) and ``output``."""

    input: torch.Tensor | None = None
    output: torch.Tensor | None = None


class Trace(Mapping[str, Record]):
    """Context manager returned by :func:`trace`; maps each traced name to its :class:`Record`."""

    def __init__(
        self,
        model: nn.Module,
        modules: Iterable[str] | Mapping[str, nn.Module],
        *,
        retain_input: bool = False,
        retain_output: bool = True,
        edit_output: EditFn | None = None,
        edit_input: EditFn | None = None,
        stop: bool = False,
        detach: bool = True,
        clone: bool = False,
    ) -> None:
        if isinstance(modules, Mapping):
            self._modules = dict(modules)
        else:
            names = list(modules)
            if isinstance(modules, str):
                raise TypeError("trace() takes a list of module paths, not a single string")
            self._modules = {name: model.get_submodule(name) for name in names}
        if not self._modules:
            raise ValueError("trace() needs at least one module")
        self._opts = (retain_input, retain_output, detach, clone)
        self._edit_output = edit_output
        self._edit_input = edit_input
        self._stop = stop
        self._records: dict[str, Record] = {name: Record() for name in self._modules}
        self._handles: list[Any] = []
        self._fired: set[str] = set()

    # Mapping protocol
    def __getitem__(self, name: str) -> Record:
        return self._records[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        _, _, detach, clone = self._opts
        if detach:
            t = t.detach()
        return t.clone() if clone else t

    def _make_pre_hook(self, name: str) -> Callable[..., Any]:
        retain_input = self._opts[0]

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if args:
                value, where = args[0], "arg"
            elif "hidden_states" in kwargs:
                value, where = kwargs["hidden_states"], "kw"
            else:
                value = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
                where = "none"
            if value is None:
                return None
            if self._edit_input is not None:
                new = self._edit_input(name, value)
                if new is not None:
                    if where == "arg":
                        args = (new, *args[1:])
                    elif where == "kw":
                        kwargs = {**kwargs, "hidden_states": new}
                    value = new
            if retain_input:
                self._records[name].input = self._keep(value)
            return (args, kwargs) if self._edit_input is not None else None

        return hook

    def _make_hook(self, name: str) -> Callable[..., Any]:
        retain_output = self._opts[1]

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            result = None
            if self._edit_output is not None:
                new = self._edit_output(name, primary(output))
                if new is not None:
                    result = output = _replace_primary(output, new)
            if retain_output:
                self._records[name].output = self._keep(primary(output))
            self._fired.add(name)
            if self._stop and len(self._fired) == len(self._modules):
                raise StopForward()
            return result

        return hook

    def __enter__(self) -> Trace:
        try:
            for name, module in self._modules.items():
                if self._opts[0] or self._edit_input is not None:
                    self._handles.append(
                        module.register_forward_pre_hook(self._make_pre_hook(name), with_kwargs=True)
                    )
                self._handles.append(module.register_forward_hook(self._make_hook(name)))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)


def trace(
    model: nn.Module,
    modules: Iterable[str] | Mapping[str, nn.Module],
    *,
    retain_input: bool = False,
    retain_output: bool = True,
    edit_output: EditFn | None = None,
    edit_input: EditFn | None = None,
    stop: bool = False,
    detach: bool = True,
    clone: bool = False,
) -> Trace:
    """Trace (and optionally edit) modules of ``model`` during forward passes run inside the ``with`` block.

    Args:
        model: the root module; string paths are resolved against it.
        modules: dotted paths, or a mapping ``name -> module``.
        retain_input: keep each module's primary input (``Record.input``).
        retain_output: keep each module's primary output (``Record.output``).
        edit_output: ``fn(name, output) -> new output or None``; applied before retaining.
        edit_input: ``fn(name, input) -> new input or None``; applied before the module runs.
        stop: raise :class:`StopForward` once every traced module has run (the ``with`` swallows it).
        detach: detach retained tensors from the autograd graph (set ``False`` to backpropagate through them).
        clone: clone retained tensors (needed when a later in-place op would overwrite them).
    """
    return Trace(
        model,
        modules,
        retain_input=retain_input,
        retain_output=retain_output,
        edit_output=edit_output,
        edit_input=edit_input,
        stop=stop,
        detach=detach,
        clone=clone,
    )
