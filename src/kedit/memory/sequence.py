"""What a layer hook of a side memory needs to know about the forward pass in flight: the attention mask and how
many tokens are already in the KV cache (0 at a sequence's start: a prefill or a teacher-forced forward).

Forward hooks on one layer do not see the model's keyword arguments, so a pre-hook on the root model stores them on
the memory object (``mem._ctx = (mask, cache length)``) and a post-hook clears them. GRACE's span replacement and
WISE's router both use this: a decision made at a sequence's start is carried through its KV-cached decode steps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["ForwardContext", "cache_len"]


def cache_len(kwargs: dict) -> int:
    """Tokens already in the KV cache of this forward (``past_key_values`` or, in newer transformers, ``cache``;
    else ``cache_position``); 0 without a cache."""
    pkv = kwargs.get("past_key_values", kwargs.get("cache"))
    if pkv is not None:
        if hasattr(pkv, "get_seq_length"):
            return int(pkv.get_seq_length())
        try:
            return int(pkv[0][0].shape[-2])
        except (TypeError, IndexError, AttributeError):
            return 0
    pos = kwargs.get("cache_position")
    return int(pos[0]) if isinstance(pos, torch.Tensor) and pos.numel() else 0


class ForwardContext:
    """Root-model pre-hook and hook setting ``mem._ctx`` to ``(attention mask or None, cache length)`` for the
    forward in flight and back to ``None`` after it."""

    def __init__(self, mem: Any) -> None:
        self.mem = mem

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        self.mem._ctx = (mask if isinstance(mask, torch.Tensor) else None, cache_len(kwargs))

    def post(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.mem._ctx = None

    def install(self, root: nn.Module) -> list[Any]:
        """Register both hooks on ``root``; returns their handles."""
        return [root.register_forward_pre_hook(self.pre, with_kwargs=True),
                root.register_forward_hook(self.post, always_call=True)]
