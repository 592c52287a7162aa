"""Unlearning: forget what must go, keep what must stay (issue #14, first slice).

Modules: :mod:`.splits` (testbed forget/retain splits), :mod:`.retain_model` (the forget-quality reference),
:mod:`.loaders` (TOFU and KnowUnDo formats), :mod:`.metrics` (truth ratio, forget quality, model utility,
membership inference), :mod:`.methods` (Trainer-based unlearning methods), :mod:`.run` (one unlearning run that
ends in a kedit delta). Imports are lazy: importing this package does not import torch or transformers.
"""

from __future__ import annotations

__all__: list[str] = []
