"""Batching helpers written once for the whole library: padding a batch of token-id sequences, the id used for
padding, the device a model's inputs go to, and the check that a batch of edit requests does not contradict
itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kedit.requests import EditRequest

__all__ = ["ConflictingRequestsError", "check_conflicts", "conflicting_pairs", "device_of", "pad_batch", "pad_id"]

PAD_SIDES = ("right", "left")


def pad_batch(
    seqs: Sequence[Sequence[int] | torch.Tensor],
    pad_id: int,
    device: torch.device | str | None = None,
    *,
    side: str = "right",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id sequences (lists of ints or 1-D tensors) to one width; returns ``(input_ids, attention_mask)``, both
    ``long`` ``[B, T]``, on ``device`` (``None``: the CPU).

    ``side="right"`` (default) puts the real tokens first, so position ``t`` of a row is its ``t``-th token and no
    position ids are needed; it is also the safe choice for statistics (with left padding the leading pad queries
    attend to nothing, and some models, e.g. Gemma-2 in fp64 with eager attention, produce NaN rows that leak into
    real tokens through ``0 · NaN``). ``side="left"`` aligns the last tokens, as batched generation needs.
    """
    if side not in PAD_SIDES:
        raise ValueError(f"side must be one of {PAD_SIDES}, got {side!r}")
    if not seqs:
        raise ValueError("pad_batch needs at least one sequence")
    rows = [s.long().reshape(-1) if isinstance(s, torch.Tensor) else torch.tensor(list(s), dtype=torch.long)
            for s in seqs]
    width = max(int(r.numel()) for r in rows)
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = int(r.numel())
        if n == 0:
            continue
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, cols] = r
        mask[i, cols] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


def pad_id(tok: Any) -> int:
    """The id written at padded positions: the tokenizer's pad token, else its end-of-text token, else 0. Any
    valid id works wherever the attention mask hides the pads; no pad token is required."""
    for name in ("pad_token_id", "eos_token_id"):
        cand = getattr(tok, name, None)
        if cand is not None:
            return int(cand)
    return 0


def device_of(model: nn.Module) -> torch.device:
    """Where a model's ``input_ids`` go: the device of its input embedding (the first parameter's if it has
    none). For a model split over devices (``device_map``) this is the first shard, not an arbitrary one."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    return next(model.parameters()).device


class ConflictingRequestsError(ValueError):
    """Two requests of one batch ask the same prompt about the same subject for different targets."""


def _label(i: int, req: EditRequest) -> str:
    """A request named by its ``case_id`` if it has one, else by its 1-based position in the batch."""
    return f"case {req.case_id!r}" if req.case_id is not None else f"request {i + 1} (1-based position)"


def conflicting_pairs(requests: Sequence[EditRequest]) -> list[tuple[int, int]]:
    """``(i, j)`` (0-based, ``i < j``) for each request ``j`` whose subject and prompt equal those of an earlier
    request ``i`` (its first occurrence) while its ``target_new`` differs. Exact duplicates (same target) are not
    conflicts."""
    first: dict[tuple[str, str], int] = {}
    out = []
    for j, req in enumerate(requests):
        key = (req.subject.strip(), req.text.strip())
        i = first.setdefault(key, j)
        if i != j and requests[i].target_new != req.target_new:
            out.append((i, j))
    return out


def check_conflicts(requests: Sequence[EditRequest], name: str) -> None:
    """Refuse a batch in which two requests ask the same prompt about the same subject for different targets.

    Computed jointly, such requests share one key and pull its value towards two answers, so both edits fail
    without an error. The message names both records (case id, else 1-based position) and the two targets.
    Sequential methods (ROME) do not call this: there a later request legitimately overrides an earlier one.
    """
    pairs = conflicting_pairs(requests)
    if not pairs:
        return
    lines = [
        f"{_label(i, requests[i])} and {_label(j, requests[j])} both ask {requests[j].text!r} "
        f"but for {requests[i].target_new!r} and {requests[j].target_new!r}"
        for i, j in pairs
    ]
    raise ConflictingRequestsError(
        f"{name}: {len(pairs)} contradicting request pair(s) in one batch, no edit can satisfy both of a pair: "
        + "; ".join(lines)
        + ". Edit them in separate batches (or keep one of each pair)."
    )
