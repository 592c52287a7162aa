"""GRACE: a discrete key-value codebook at one layer; the weights are never changed.

Hartvigsen, Sankaranarayanan, Palangi, Kim, Ghassemi, "Aging with GRACE: Lifelong Model Editing with Discrete
Key-Value Adaptors", NeurIPS 2023.

For each request (one after another; the codebook rules are in :mod:`kedit.memory.codebook`):

* **key** ``k``: the input of the MLP output projection (kedit.arch slot ``mlp_out``) of layer ``l`` at the last
  prompt token, from a forward of the prompt alone (as generation's prefill computes it);
* **value** ``v``: initialised to that projection's output there and trained with Adam (``value_lr``,
  ``value_steps``) so that, with ``v`` replacing the projection's output at the last prompt token and at the
  target positions after it (``replacement="span"``, the entry's span = the target's token count; ``"last"``: the
  last prompt token only), the teacher-forced target has a mean token NLL below ``early_stop_loss``;
* **deferral radius** ``ε₀ = epsilon``.

The result is an :class:`~kedit.deltas.EditDelta` of :class:`~kedit.deltas.MemoryEntryUpdate` entries, one per
request, each with a fresh edit id; applying it adds them to the model's codebook (expand / split happen there),
reverting removes them. ``compute`` does not touch the model or its memory: the key depends on the layers below
``l`` only, and the value is trained against the unedited layer.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from kedit.arch import get_adapter
from kedit.core.batching import device_of
from kedit.core.context import EditContext
from kedit.core.keys import target_ids
from kedit.deltas import EditDelta, MemoryEntryUpdate
from kedit.deltas.ledger import compute_dtype
from kedit.memory import memory_layer
from kedit.methods.ft.objective import keep_grad_flags
from kedit.methods.presets import preset_for
from kedit.methods.registry import register_method
from kedit.requests import EditRequest

__all__ = ["GRACEConfig", "compute_grace", "grace_layer"]

log = logging.getLogger(__name__)

_PAPER = ("Hartvigsen et al., Aging with GRACE: Lifelong Model Editing with Discrete Key-Value Adaptors, "
          "NeurIPS 2023")


@dataclass
class GRACEConfig:
    """GRACE hyper-parameters (the reference's names in parentheses).

    Attributes:
        layer: the layer whose ``mlp_out`` projection carries the codebook; ``None``: ``round(layer_fraction ·
            (L − 1))`` (``inner_params``).
        layer_fraction: where ``layer=None`` puts the codebook, as a fraction of the depth.
        epsilon: initial deferral radius ε₀ of a new key, Euclidean, in the key's units (``eps``).
        value_lr: Adam learning rate of the value (``edit_lr``).
        value_steps: at most this many Adam steps per edit (``n_iter``).
        early_stop_loss: stop training once the mean target-token NLL is below this.
        replacement: ``"span"`` (default): the value replaces the layer output at the last prompt token *and* at
            the target's positions after it, in training and whenever the key hits (the entry's span = the
            target's token count); ``"last"``: at the last prompt token only. One vector at one position cannot
            produce every long target (testbed-llama: 86 % of the first 10 lifelong edits with ``"last"``).
    """

    layer: int | None = None
    layer_fraction: float = 0.8
    epsilon: float = 1.0
    value_lr: float = 1.0
    value_steps: int = 100
    early_stop_loss: float = 0.05
    replacement: str = "span"

    def __post_init__(self) -> None:
        if self.replacement not in ("span", "last"):
            raise ValueError(f"grace: replacement must be 'span' or 'last', got {self.replacement!r}")
        if not self.epsilon > 0:
            raise ValueError(f"grace: epsilon must be > 0, got {self.epsilon}")
        if self.value_steps < 1 or not self.value_lr > 0:
            raise ValueError("grace: value_steps must be ≥ 1 and value_lr > 0")
        if not 0.0 <= self.layer_fraction <= 1.0:
            raise ValueError(f"grace: layer_fraction must be in [0, 1], got {self.layer_fraction}")


def grace_layer(model: nn.Module, cfg: GRACEConfig) -> int:
    return memory_layer(model, cfg.layer, cfg.layer_fraction)


@contextmanager
def _at(module: nn.Module, pos: int, store: dict, value: torch.Tensor | None = None, span: int = 1):
    """Record the module's input/output at ``pos`` (row 0); with ``value``, replace the output at ``pos`` and the
    ``span − 1`` positions after it."""

    def hook(mod, args, out):
        store["key"] = args[0][0, pos].detach()
        store["out"] = out[0, pos].detach()
        if value is None:
            return None
        out = out.clone()
        out[0, pos : pos + span] = value.to(out.dtype)
        return out

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _edit_one(model: nn.Module, tok, req: EditRequest, module: nn.Module, cfg: GRACEConfig, label: str):
    device = device_of(model)
    prompt = tok(req.text, add_special_tokens=True)["input_ids"]
    if not prompt:
        raise ValueError(f"{label}: prompt {req.text!r} tokenizes to nothing")
    tgt = target_ids(tok, req.target_new)
    last = len(prompt) - 1
    store: dict = {}
    with torch.no_grad(), _at(module, last, store):
        model(input_ids=torch.tensor([prompt], device=device))
    cdt = compute_dtype(module.weight.dtype)  # fp32; fp64 for fp64 models
    key = store["key"].to(cdt).clone()
    value = store["out"].to(cdt).clone().requires_grad_(True)
    ids = torch.tensor([prompt + tgt[:-1]], device=device)
    pos = torch.arange(last, last + len(tgt), device=device)
    labels = torch.tensor(tgt, device=device)
    span = len(tgt) if cfg.replacement == "span" else 1
    opt = torch.optim.Adam([value], lr=cfg.value_lr)
    loss_v = float("inf")
    steps = 0
    for steps in range(1, cfg.value_steps + 1):  # noqa: B007  (read after the loop)
        opt.zero_grad()
        with _at(module, last, {}, value, span):
            logits = model(input_ids=ids).logits[0, pos].float()
        loss = torch.nn.functional.cross_entropy(logits, labels)
        loss_v = float(loss.detach())
        if loss_v < cfg.early_stop_loss:
            break
        loss.backward()
        opt.step()
    if not torch.isfinite(value).all():
        raise ValueError(f"{label}: the GRACE value diverged (non-finite); lower value_lr")
    log.debug("%s: value trained in %d step(s), loss %.4f", label, steps, loss_v)
    return key, value.detach().clone(), loss_v, steps, span


def compute_grace(
    model: nn.Module, tok, requests: Sequence[EditRequest], cfg: GRACEConfig, ctx: EditContext | None = None
) -> EditDelta:
    """One codebook entry per request (see the module docstring); the model is left bit-identical."""
    from kedit.api import record_label

    adapter = get_adapter(model)
    layer = grace_layer(model, cfg)
    path = adapter.path("mlp_out", layer)
    module = adapter.module(model, "mlp_out", layer)
    updates = []
    losses = []
    with keep_grad_flags(model, freeze=True):
        for i, req in enumerate(requests):
            label = record_label(i, req.case_id)
            key, value, loss, steps, span = _edit_one(model, tok, req, module, cfg, label)
            edit_id = uuid.uuid4().hex[:16]
            info = {"edit_id": edit_id, "module": path, "label": req.target_new.strip(), "epsilon": float(cfg.epsilon),
                    "method": "grace", "span": span}
            updates.append(MemoryEntryUpdate(f"{path}#grace:{edit_id}", key.cpu(), value.cpu(), info))
            losses.append({"edit_id": edit_id, "loss": loss, "steps": steps})
    return EditDelta.for_model(model, updates, method="grace", config=asdict(cfg), requests=requests,
                               meta={"layer": layer, "module": path, "value_training": losses})


def _presets(model: nn.Module) -> dict:
    return preset_for("grace", model)


register_method(
    "grace",
    config=GRACEConfig,
    compute=compute_grace,
    paper=_PAPER,
    summary="discrete key-value codebook at one layer (side memory, weights untouched; edits removable by id)",
    presets=_presets,
    mergeable=False,
    rollback="by edit id, any order (side memory)",
    batched=False,
)
