"""Forgetting-aware fine-tuning: two-phase LoRA tuning with an importance-weighted pull towards the phase-1
parameters (Song et al., "How to Alleviate Catastrophic Forgetting in LLMs Finetuning? Hierarchical Layer-Wise and
Element-Wise Regularization", arXiv 2501.13669), with Synaptic Intelligence importances (Zenke, Poole & Ganguli,
ICML 2017) and the EWC-on-LoRA baseline (Kirkpatrick et al., PNAS 2017). See ``docs/finetune.md``."""

from __future__ import annotations

from .importance import Importance, SIAccumulator, fisher_diagonal
from .regularizer import LAYER_COEFFS, ImportancePenalty

__all__ = ["LAYER_COEFFS", "Importance", "ImportancePenalty", "SIAccumulator", "fisher_diagonal"]
