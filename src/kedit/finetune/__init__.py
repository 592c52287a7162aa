"""Forgetting-aware fine-tuning: two-phase LoRA tuning with an importance-weighted pull towards the phase-1
parameters (Song et al., "How to Alleviate Catastrophic Forgetting in LLMs Finetuning? Hierarchical Layer-Wise and
Element-Wise Regularization", arXiv 2501.13669), with Synaptic Intelligence importances (Zenke, Poole & Ganguli,
ICML 2017) and the EWC-on-LoRA baseline (Kirkpatrick et al., PNAS 2017). See ``docs/finetune.md``.

Imports are lazy (``kedit --help`` registers ``kedit finetune`` without importing torch)."""

from __future__ import annotations

from typing import Any

__all__ = [
    "LAYER_COEFFS",
    "FinetuneConfig",
    "Importance",
    "ImportancePenalty",
    "SIAccumulator",
    "finetune",
    "fisher_diagonal",
]

_WHERE = {
    "LAYER_COEFFS": "regularizer",
    "ImportancePenalty": "regularizer",
    "Importance": "importance",
    "SIAccumulator": "importance",
    "fisher_diagonal": "importance",
    "FinetuneConfig": "run",
    "finetune": "run",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
