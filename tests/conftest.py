"""Shared test setup: offline Hugging Face, quiet tokenizers, deterministic torch threads."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

# tiny models: one intra-op thread is faster than two (and immune to oversubscription)
torch.set_num_threads(1)
