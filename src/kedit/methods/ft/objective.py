"""The fine-tuning objectives of FT-L / FT-M and the small Adam loop shared by FT and LoRA.

Two losses (METHODS.md §1; Zhu et al., "Modifying Memories in Transformer Models", arXiv 2012.00363, as used in
ROME's baselines and EasyEdit):

* ``"prompt_last"`` (FT-L): the logits at the **last prompt token** score every target token -- a bag-of-tokens
  loss, ``−(1/|o*|) Σ_t log p(o*_t | p)``, without teacher forcing.
* ``"target_new"`` (FT-M): teacher-forced cross-entropy over ``p ⊕ o*`` with the prompt masked,
  ``−(1/|o*|) Σ_t log p(o*_t | p ⊕ o*_{<t})``. The ids are **prompt ids + target ids** (never the tokenised joint
  string), so the prompt/target boundary is exact whatever the tokenizer merges, and rows are right-padded with
  an attention mask, so the padding side does not matter (the reference masks "left pads + prompt length", which
  is only right with left padding and prefix-stable tokenisation, METHODS.md §1 pitfalls).

Both are per request means over the target tokens; a batch loss is the mean over its requests.

Both reduce to one gather: every request contributes ``(row, position, token)`` triples, and the loss of a
request is the mean of ``−log softmax(logits[row, position])[token]`` over its triples. Targets are tokenised with
:func:`kedit.core.keys.target_ids` (leading space, no BOS: on Llama the reference FT-L also trains ``<s>``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kedit.core.batching import device_of, pad_batch, pad_id
from kedit.core.keys import target_ids
from kedit.requests import EditRequest

__all__ = [
    "LOSSES",
    "LossBatch",
    "TrainResult",
    "build_loss_batches",
    "keep_grad_flags",
    "request_losses",
    "teacher_forced_logprob",
    "train_adam",
]

log = logging.getLogger(__name__)

LOSSES = ("prompt_last", "target_new")


@dataclass
class LossBatch:
    """Padded ids of a mini-batch of requests plus the scored ``(row, position, token)`` triples."""

    ids: torch.Tensor  #: [B, T]
    mask: torch.Tensor  #: [B, T]
    rows: torch.Tensor  #: [N] row of each scored token
    pos: torch.Tensor  #: [N] position whose logits score it
    tokens: torch.Tensor  #: [N] the target token
    weight: torch.Tensor  #: [N] 1 / (number of target tokens of the row)
    requests: list[int]  #: indices (into the full request list) of the rows

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])


def _request_label(i: int, req: EditRequest) -> str:
    return f"request #{i}" + (f" (case {req.case_id})" if req.case_id is not None else "")


def _encode(tok, i: int, req: EditRequest) -> tuple[list[int], list[int]]:
    prompt = tok(req.text, add_special_tokens=True)["input_ids"]
    if not prompt:
        raise ValueError(f"{_request_label(i, req)}: prompt {req.text!r} tokenizes to nothing")
    try:
        tgt = target_ids(tok, req.target_new)
    except ValueError as e:
        raise ValueError(f"{_request_label(i, req)}: {e}") from None
    return list(prompt), tgt


def build_loss_batches(
    tok, requests: Sequence[EditRequest], loss: str, device: torch.device, batch_size: int | None = None
) -> list[LossBatch]:
    """Tokenise ``requests`` for ``loss`` and cut them into mini-batches of ``batch_size`` (all at once if None).

    Every request is validated first, so a bad one raises (naming it) before any training starts.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1 or None, got {batch_size}")
    encoded = [_encode(tok, i, r) for i, r in enumerate(requests)]
    size = batch_size or max(1, len(requests))
    pid = pad_id(tok)
    batches = []
    for b in range(0, len(encoded), size):
        seqs, rows, pos, toks, wts = [], [], [], [], []
        for r, (prompt, tgt) in enumerate(encoded[b : b + size]):
            last = len(prompt) - 1
            if loss == "prompt_last":
                seqs.append(prompt)
                positions = [last] * len(tgt)
            else:  # teacher forcing: position last + t predicts tgt[t]
                seqs.append(prompt + tgt[:-1])
                positions = [last + t for t in range(len(tgt))]
            rows += [r] * len(tgt)
            pos += positions
            toks += tgt
            wts += [1.0 / len(tgt)] * len(tgt)
        ids, mask = pad_batch(seqs, pid, device)
        batches.append(
            LossBatch(
                ids=ids,
                mask=mask,
                rows=torch.tensor(rows, device=device),
                pos=torch.tensor(pos, device=device),
                tokens=torch.tensor(toks, device=device),
                weight=torch.tensor(wts, device=device),
                requests=list(range(b, b + len(seqs))),
            )
        )
    return batches


def request_losses(logits: torch.Tensor, batch: LossBatch) -> torch.Tensor:
    """Per-request loss ``[B]``: mean over each request's target tokens of ``−log p`` (fp32 log-softmax).

    Only the scored positions enter the graph, so the gradient w.r.t. every other position's logits (the prompt
    positions for FT-M, padding for both) is exactly zero.
    """
    sel = logits[batch.rows, batch.pos].float()
    logp = F.log_softmax(sel, dim=-1).gather(1, batch.tokens[:, None]).squeeze(1)
    out = torch.zeros(batch.size, device=logits.device, dtype=torch.float32)
    return out.index_add(0, batch.rows, -logp * batch.weight)


@dataclass
class TrainResult:
    epochs: int  #: epochs run
    steps: int  #: optimiser steps taken (skipped steps not counted)
    loss: float  #: mean loss of the last epoch
    request_loss: list[float]  #: last loss of every request
    history: list[float]  #: epoch mean losses


def train_adam(
    params: Sequence[torch.Tensor],
    logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: Sequence[LossBatch],
    *,
    n_requests: int,
    lr: float,
    epochs: int,
    weight_decay: float = 0.0,
    skip_step_loss: float = 1e-2,
    early_stop_loss: float = 1e-2,
    after_step: Callable[[], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Adam over ``params`` (leaf tensors) for at most ``epochs`` passes over ``batches`` (EasyEdit's FT loop).

    A step is skipped when the batch loss is below ``skip_step_loss``; training stops when the epoch's mean loss
    (weighted by batch size) is below ``early_stop_loss``. ``after_step`` runs after every step (FT's clamp).
    Gradients are taken with ``torch.autograd.grad`` w.r.t. ``params`` only.
    """
    params = list(params)
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    last = [float("nan")] * n_requests
    history: list[float] = []
    steps = 0
    mean = float("nan")
    epoch = 0
    for epoch in range(1, epochs + 1):
        total, count = 0.0, 0
        for batch in batches:
            per_req = request_losses(logits_fn(batch.ids, batch.mask), batch)
            loss = per_req.mean()
            value = float(loss.detach())
            for j, r in enumerate(batch.requests):
                last[r] = float(per_req[j].detach())
            total += value * batch.size
            count += batch.size
            if value >= skip_step_loss:
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for p, g in zip(params, grads):
                    p.grad = torch.zeros_like(p) if g is None else g
                opt.step()
                opt.zero_grad(set_to_none=True)
                steps += 1
                if after_step is not None:
                    after_step()
        mean = total / max(count, 1)
        history.append(mean)
        if progress is not None:
            progress(epoch, epochs)
        if mean < early_stop_loss:
            break
    return TrainResult(epochs=epoch, steps=steps, loss=mean, request_loss=last, history=history)


@contextmanager
def keep_grad_flags(model: nn.Module, *, freeze: bool = False) -> Iterator[None]:
    """Restore every parameter's ``requires_grad`` flag and the train/eval mode on exit; with ``freeze``, turn
    all flags off inside (no graph is built for the model's own weights) and switch to eval mode."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        if freeze:
            for p, _ in flags:
                p.requires_grad_(False)
            model.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def teacher_forced_logprob(model: nn.Module, tok, request: EditRequest) -> float:
    """``log P(o* | p)`` summed over the target tokens (teacher forced) -- used by tests and diagnostics."""
    (batch,) = build_loss_batches(tok, [request], "target_new", device_of(model))
    with torch.no_grad():
        logits = model(input_ids=batch.ids, attention_mask=batch.mask).logits
    n_tok = int(batch.tokens.numel())
    return float(-request_losses(logits, batch)[0]) * n_tok
