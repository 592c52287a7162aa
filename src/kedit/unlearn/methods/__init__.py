"""Unlearning methods on ``transformers.Trainer``, one module each (``compute_loss`` overrides), registered in
:mod:`.registry`: GradAscent, GradDiff, NPO, SimNPO, RMU, RKLD, MemFlex."""

from __future__ import annotations

from .registry import UnlearnMethodSpec, get_unlearn_method, list_unlearn_methods, register_unlearn_method

__all__ = ["UnlearnMethodSpec", "get_unlearn_method", "list_unlearn_methods", "register_unlearn_method"]
