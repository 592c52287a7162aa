"""The high-level Python API: load a model, edit it, measure whether the edit took.

    model, tok = kedit.load_model("testbed-gpt2")          # or any HF name / path
    result = kedit.edit(model, tok, requests, method="rome")
    result.success_rate                                      # greedy answer now starts with target_new
    result.revert(model)                                     # exact rollback (LIFO)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kedit.core.batching import device_of, pad_batch, pad_id
from kedit.core.context import EditContext
from kedit.core.keys import target_ids
from kedit.deltas import EditDelta, revert_deltas
from kedit.methods.registry import get_method
from kedit.requests import EditRequest, as_requests

__all__ = ["load_model", "edit", "EditResult", "greedy_answers", "answers_match", "TESTBED_MODELS"]

log = logging.getLogger(__name__)

#: model names that resolve to the embedded testbed checkpoints
TESTBED_MODELS = {"testbed-gpt2": "gpt2", "testbed-llama": "llama"}


def load_model(
    name: str, *, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None, **kwargs: Any
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` by name.

    ``testbed-gpt2`` / ``testbed-llama`` are the embedded testbed models (offline). Anything else is passed to
    ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` (a hub id or a local path);
    ``kwargs`` are forwarded (e.g. ``revision=``, ``device_map="auto"``).
    """
    if name in TESTBED_MODELS:
        from kedit.testbed import load_testbed_model

        return load_testbed_model(TESTBED_MODELS[name], dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    tok = AutoTokenizer.from_pretrained(name, **{k: v for k, v in kwargs.items() if k in ("revision",)})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
    if device is not None:
        model = model.to(device)
    return model.eval(), tok


def answers_match(generated: str, target: str) -> bool:
    """Whether a greedy continuation starts with ``target`` (whitespace-normalised, case-sensitive)."""
    gen = " ".join(generated.split())
    tgt = " ".join(target.split())
    return bool(tgt) and gen.startswith(tgt)


@torch.no_grad()
def greedy_answers(
    model: nn.Module,
    tok,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 64,
    full_length: bool = False,
) -> list[str]:
    """Greedy continuations of ``prompts`` (batched, left-padded), decoded without special tokens.

    With ``full_length`` every continuation has exactly ``max_new_tokens`` tokens (end-of-text is suppressed),
    as fluency measurements need: a model that ends its sentence after the answer would otherwise be scored on
    one word.
    """
    device = device_of(model)
    out: list[str] = []
    pid = pad_id(tok)
    for b in range(0, len(prompts), batch_size):
        chunk = list(prompts[b : b + batch_size])
        enc = [tok(p, add_special_tokens=True)["input_ids"] for p in chunk]
        ids, mask = pad_batch(enc, pid, device, side="left")
        width = ids.shape[1]
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens if full_length else None,
            do_sample=False,
            pad_token_id=pid,
        )
        for row in gen[:, width:]:
            out.append(tok.decode(row, skip_special_tokens=True))
    return out


@dataclass
class EditResult:
    """Outcome of :func:`edit`: the applied deltas (one per batch, in order), per-request success, timings."""

    method: str
    deltas: list[EditDelta]
    requests: list[EditRequest]
    success: list[bool] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def success_rate(self) -> float:
        return sum(self.success) / len(self.success) if self.success else float("nan")

    def revert(self, model: nn.Module) -> None:
        """Undo every applied delta, newest first (bitwise exact; one replay per parameter, all-or-nothing)."""
        revert_deltas(model, [d for d in reversed(self.deltas) if d.is_applied])


def edit(
    model: nn.Module,
    tok,
    requests: Sequence[EditRequest | Mapping[str, Any]],
    method: str = "rome",
    *,
    config: Any = None,
    batch_size: int | None = None,
    ctx: EditContext | None = None,
    apply: bool = True,
    evaluate: bool = True,
    max_new_tokens: int | None = None,
) -> EditResult:
    """Edit ``model`` with ``requests`` using ``method``.

    Requests are processed in batches of ``batch_size`` (default: all at once for batched methods); each batch's
    delta is computed on the model with the previous batches applied (sequential editing) and applied when
    ``apply`` is true. ``config`` is a config dataclass or a dict of overrides on the architecture preset.
    With ``evaluate``, success = the greedy continuation of each request's prompt starts with ``target_new``
    (``max_new_tokens`` defaults to the longest target's token count + 2, so long targets are never cut off).
    """
    spec = get_method(method)
    reqs = as_requests(list(requests))
    if not reqs:
        raise ValueError("no edit requests given")
    if config is None or isinstance(config, Mapping):
        cfg = spec.make_config(config, base=spec.default_config(model))
    elif isinstance(config, spec.config):
        cfg = config
    else:
        raise TypeError(f"config for {spec.name} must be a {spec.config.__name__} or a dict")
    ctx = ctx or EditContext()
    size = batch_size or len(reqs)
    if size < 1:
        raise ValueError("batch_size must be ≥ 1")
    if not apply and size < len(reqs):
        raise ValueError("sequential batches need apply=True (each batch is computed on the edited model)")
    result = EditResult(method=spec.name, deltas=[], requests=reqs)
    t0 = time.perf_counter()
    compute_s = 0.0
    try:
        for b in range(0, len(reqs), size):
            batch = reqs[b : b + size]
            tc = time.perf_counter()
            delta = spec.compute(model, tok, batch, cfg, ctx)
            compute_s += time.perf_counter() - tc
            if apply:
                delta.apply(model)
            result.deltas.append(delta)
    except BaseException:
        result.revert(model)  # nothing half-applied
        raise
    result.timings["compute_s"] = compute_s
    result.timings["edit_s"] = time.perf_counter() - t0
    if evaluate and apply:
        te = time.perf_counter()
        if max_new_tokens is None:
            max_new_tokens = max(len(target_ids(tok, r.target_new)) for r in reqs) + 2
        result.answers = greedy_answers(model, tok, [r.text for r in reqs], max_new_tokens=max_new_tokens)
        result.success = [answers_match(a, r.target_new) for a, r in zip(result.answers, reqs)]
        result.timings["eval_s"] = time.perf_counter() - te
    return result
