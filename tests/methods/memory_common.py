"""Shared checks of the memory-method tests (GRACE, WISE); their fixtures are in tests/methods/conftest.py. "No
memory left" means no model attribute and no forward or forward-pre hook anywhere."""

from __future__ import annotations

import torch

from kedit.memory import MEMORY_ATTR


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def logits(model, tok, text):
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits


def no_memory(model):
    assert MEMORY_ATTR not in model.__dict__
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
