"""WISE: a side memory (a copy of one FFN output projection) behind an activation-score router; the weights are never
changed.

Wang, Li, Yao, Zhang, Xi, Zhang, Chen, Chen, "WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of
Large Language Models", NeurIPS 2024. Knowledge shards are merged with TIES-Merging (Yadav et al., NeurIPS 2023).

For each request (one after another; the memory, its router and the merge are in :mod:`kedit.memory.side`):

* the side memory starts as a copy of the MLP output projection ``W`` of layer ``l`` (kedit.arch slot
  ``mlp_out``); the request's *knowledge shard* may change only the entries of a random mask of ratio
  ``mask_ratio`` (seeded by ``seed`` and the request's text, kept in the record): ``W' = W + M ⊙ ΔW``;
* the shard is trained with Adam (``lr``, at most ``steps``) on the teacher-forced target NLL with the side memory
  on every position, plus the routing margins ``L_a = mean max(0, Δ_act(x_irr) − α) + max(0, β − Δ_act(x_e))
  + mean max(0, γ − (Δ_act(x_e) − Δ_act(x_irr)))`` where ``Δ_act(x) = mean_t ‖a_t (W' − W)ᵀ‖`` (``a_t`` the
  projection's input), ``x_e`` the edit's prompt (and prompt ⊕ target; the smaller score counts) and ``x_irr``
  ``n_irrelevant`` texts of the editing corpus (``EditContext.texts_for``: the testbed corpus for testbed models);
* training stops once the NLL is below ``early_stop_loss`` and every margin holds.

The result is an :class:`~kedit.deltas.EditDelta` of :class:`~kedit.deltas.MemoryEntryUpdate` entries, one per
request (key: the edit's activations, value: its shard's masked entries), each with a fresh edit id; applying it
adds the shards to the model's side memory (merged there with TIES; the threshold ``ε`` follows), reverting removes
them. ``compute`` does not read the memory: every shard is trained against the unedited layer.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from kedit.arch import get_adapter, math_weight
from kedit.core.batching import device_of
from kedit.core.context import EditContext
from kedit.core.keys import target_ids
from kedit.deltas import EditDelta, MemoryEntryUpdate
from kedit.deltas.ledger import compute_dtype
from kedit.memory import memory_layer
from kedit.memory.side import activation_score, shard_mask
from kedit.methods.ft.objective import keep_grad_flags
from kedit.methods.presets import preset_for
from kedit.methods.registry import register_method
from kedit.requests import EditRequest

__all__ = ["WISEConfig", "compute_wise", "wise_layer"]

log = logging.getLogger(__name__)

_PAPER = ("Wang et al., WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of Large Language Models, "
          "NeurIPS 2024")


@dataclass
class WISEConfig:
    """WISE hyper-parameters (the reference's names in parentheses).

    Attributes:
        layer: the layer whose ``mlp_out`` projection gets the side memory; ``None``: ``round(layer_fraction ·
            (L − 1))`` (``inner_params``).
        layer_fraction: where ``layer=None`` puts the side memory, as a fraction of the depth.
        mask_ratio: fraction ρ of the projection's entries a shard may change (``mask_ratio``).
        lr: Adam learning rate of the shard's entries (``edit_lr``).
        steps: at most this many Adam steps per edit (``n_iter``).
        alpha, beta, gamma: the routing margins α (irrelevant scores below), β (edit score above), γ (their gap).
        act_ratio: the threshold is ``act_ratio ·`` the smallest live edit's score (``act_ratio``).
        density: TIES trim density (fraction of each shard's entries kept when shards are merged).
        n_irrelevant: irrelevant texts per edit for the margins (drawn from the editing corpus).
        irrelevant_tokens: each irrelevant text is cut to this many tokens.
        early_stop_loss: stop once the mean target NLL is below this and every margin holds.
        seed: seed of the random masks and the irrelevant-text draw (combined with the request's text).
    """

    layer: int | None = None
    layer_fraction: float = 0.8
    mask_ratio: float = 0.2
    lr: float = 0.1
    steps: int = 70
    alpha: float = 5.0
    beta: float = 20.0
    gamma: float = 10.0
    act_ratio: float = 0.88
    density: float = 0.8
    n_irrelevant: int = 8
    irrelevant_tokens: int = 32
    early_stop_loss: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio <= 1.0:
            raise ValueError(f"wise: mask_ratio must be in (0, 1], got {self.mask_ratio}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"wise: density must be in (0, 1], got {self.density}")
        if self.steps < 1 or not self.lr > 0:
            raise ValueError("wise: steps must be ≥ 1 and lr > 0")
        if not (self.alpha >= 0 and self.beta > 0 and self.gamma >= 0):
            raise ValueError("wise: margins need alpha ≥ 0, beta > 0, gamma ≥ 0")
        if not 0.0 < self.act_ratio <= 1.0:
            raise ValueError(f"wise: act_ratio must be in (0, 1], got {self.act_ratio}")
        if self.n_irrelevant < 1 or self.irrelevant_tokens < 1:
            raise ValueError("wise: n_irrelevant and irrelevant_tokens must be ≥ 1")
        if not 0.0 <= self.layer_fraction <= 1.0:
            raise ValueError(f"wise: layer_fraction must be in [0, 1], got {self.layer_fraction}")


def wise_layer(model: nn.Module, cfg: WISEConfig) -> int:
    return memory_layer(model, cfg.layer, cfg.layer_fraction)


@contextmanager
def _side(module: nn.Module, delta_fn=None, store: list | None = None):
    """While active: record the module's inputs (``store``) and/or add ``a ΔWᵀ`` to its output everywhere."""

    def hook(mod, args, out):
        if store is not None:
            store.append(args[0].detach())
        if delta_fn is None:
            return None
        d = delta_fn()
        return (out.to(d.dtype) + args[0].to(d.dtype) @ d.T).to(out.dtype)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _seed(cfg: WISEConfig, req: EditRequest) -> int:
    h = hashlib.sha256(f"{cfg.seed}\x00{req.text}\x00{req.target_new}".encode()).digest()
    return int.from_bytes(h[:7], "big")


def _irrelevant(model: nn.Module, tok, ctx: EditContext, cfg: WISEConfig, seed: int, label: str) -> list[list[int]]:
    try:
        texts, _ = ctx.texts_for(model)
    except Exception as e:  # MissingCorpusError: say what WISE needs it for
        raise ValueError(f"{label}: WISE needs generic texts for its routing margins (x_irr); pass "
                         "EditContext(corpus=texts)") from e
    texts = [t for t in (texts if isinstance(texts, list) else list(texts)) if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError(f"{label}: the editing corpus has no texts for WISE's routing margins")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(texts), generator=g)[: cfg.n_irrelevant].tolist()
    out = []
    for i in pick:
        ids = tok(texts[i], add_special_tokens=True)["input_ids"][: cfg.irrelevant_tokens]
        if ids:
            out.append(ids)
    return out


def _acts(model: nn.Module, module: nn.Module, ids: list[int], cdt: torch.dtype) -> torch.Tensor:
    store: list = []
    with torch.no_grad(), _side(module, store=store):
        model(input_ids=torch.tensor([ids], device=device_of(model)))
    return store[0][0].to(cdt)


def _edit_one(model, tok, req: EditRequest, module: nn.Module, cfg: WISEConfig, ctx: EditContext, label: str):
    device = device_of(model)
    prompt = tok(req.text, add_special_tokens=True)["input_ids"]
    if not prompt:
        raise ValueError(f"{label}: prompt {req.text!r} tokenizes to nothing")
    tgt = target_ids(tok, req.target_new)
    seed = _seed(cfg, req)
    cdt = compute_dtype(module.weight.dtype)
    d_out, d_in = math_weight(module).shape
    idx = shard_mask(seed, d_out * d_in, cfg.mask_ratio).to(device)
    ids = prompt + tgt[:-1]
    a_full = _acts(model, module, ids, cdt)  # the layer's input does not depend on its own output: fixed
    a_prompt = a_full[: len(prompt)]
    irr = [_acts(model, module, t, cdt) for t in _irrelevant(model, tok, ctx, cfg, seed, label)]
    vals = torch.zeros(idx.numel(), dtype=cdt, device=device, requires_grad=True)

    def delta() -> torch.Tensor:
        return torch.zeros(d_out * d_in, dtype=cdt, device=device).index_put((idx,), vals).view(d_out, d_in)

    def scores(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s_e = torch.minimum(activation_score(a_prompt, d), activation_score(a_full, d))
        s_irr = torch.stack([activation_score(a, d) for a in irr])
        return s_e, s_irr

    last = len(prompt) - 1
    x = torch.tensor([ids], device=device)
    pos = torch.arange(last, last + len(tgt), device=device)
    labels = torch.tensor(tgt, device=device)
    opt = torch.optim.Adam([vals], lr=cfg.lr)
    nll_v = margin_v = float("inf")
    steps = 0
    for steps in range(1, cfg.steps + 1):  # noqa: B007  (read after the loop)
        opt.zero_grad()
        d = delta()
        with _side(module, lambda d=d: d):
            logits = model(input_ids=x).logits[0, pos].float()
        nll = torch.nn.functional.cross_entropy(logits, labels)
        s_e, s_irr = scores(d)
        margin = (torch.relu(s_irr - cfg.alpha).mean() + torch.relu(cfg.beta - s_e)
                  + torch.relu(cfg.gamma - (s_e - s_irr)).mean())
        nll_v, margin_v = float(nll.detach()), float(margin.detach())
        if nll_v < cfg.early_stop_loss and margin_v == 0.0:
            break
        (nll + margin.to(nll.dtype)).backward()
        opt.step()
    final = vals.detach().clone()
    if not torch.isfinite(final).all():
        raise ValueError(f"{label}: the WISE shard diverged (non-finite); lower lr")
    with torch.no_grad():
        s_e, s_irr = scores(torch.zeros(d_out * d_in, dtype=cdt, device=device).index_put((idx,), final)
                            .view(d_out, d_in))
    if not float(s_e) > 0:
        raise ValueError(f"{label}: the WISE shard does not move the edit's activations (score 0); raise lr or steps")
    log.debug("%s: shard trained in %d step(s), nll %.4f, margins %.4f, score %.3f (irrelevant max %.3f)",
              label, steps, nll_v, margin_v, float(s_e), float(s_irr.max()))
    stats = {"loss": nll_v, "margin_loss": margin_v, "steps": steps, "score": float(s_e),
             "irrelevant_max": float(s_irr.max())}
    return a_full, len(prompt), final, seed, stats


def compute_wise(
    model: nn.Module, tok, requests: Sequence[EditRequest], cfg: WISEConfig, ctx: EditContext | None = None
) -> EditDelta:
    """One knowledge shard per request (see the module docstring); the model is left bit-identical."""
    from kedit.api import record_label

    ctx = ctx or EditContext()
    adapter = get_adapter(model)
    layer = wise_layer(model, cfg)
    path = adapter.path("mlp_out", layer)
    module = adapter.module(model, "mlp_out", layer)
    updates = []
    stats = []
    with keep_grad_flags(model, freeze=True):
        for i, req in enumerate(requests):
            label = record_label(i, req.case_id)
            acts, n_prompt, vals, seed, st = _edit_one(model, tok, req, module, cfg, ctx, label)
            edit_id = uuid.uuid4().hex[:16]
            info = {"edit_id": edit_id, "module": path, "label": req.target_new.strip(),
                    "epsilon": float(cfg.act_ratio * st["score"]), "method": "wise", "mask_seed": seed,
                    "mask_ratio": float(cfg.mask_ratio), "n_tokens": int(acts.shape[0]), "n_prompt": int(n_prompt),
                    "act_ratio": float(cfg.act_ratio), "density": float(cfg.density)}
            updates.append(MemoryEntryUpdate(f"{path}#wise:{edit_id}", acts.reshape(-1).cpu(), vals.cpu(), info))
            stats.append({"edit_id": edit_id, **st})
    return EditDelta.for_model(model, updates, method="wise", config=asdict(cfg), requests=requests,
                               meta={"layer": layer, "module": path, "shard_training": stats})


def _presets(model: nn.Module) -> dict:
    return preset_for("wise", model)


register_method(
    "wise",
    config=WISEConfig,
    compute=compute_wise,
    paper=_PAPER,
    summary="side memory (copy of one FFN output projection) behind an activation-score router; TIES-merged "
            "knowledge shards under random masks (weights untouched; edits removable by id)",
    presets=_presets,
    mergeable=False,
    rollback="by edit id, any order (side memory)",
    batched=False,
)
