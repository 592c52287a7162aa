"""Subject-token location, context templates and key extraction -- shared by every locate-then-edit method.

* **Subject location** uses the tokenizer's offset mapping: the subject's last token is the last token whose
  character span overlaps the subject's span. This is tokenizer-agnostic (BPE with or without a BOS, leading-blank
  quirks of sentencepiece) unlike the reference code's length arithmetic, and it is computed per row of a padded
  batch, so left and right padding both work.
* **Context templates** (ROME, Meng et al. 2022; MEMIT, Meng et al. 2023) are short sampled prefixes, ``"<text>. {}"``,
  that make the key/value robust to the preceding context. They are sampled with a seeded ``torch.Generator``
  (top-k), never the global RNG, and can be injected instead.
* **Keys** are the inputs of the MLP output projection (``mlp_out``) at the subject's last token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kedit.arch import ArchAdapter
from kedit.core.batching import device_of, pad_batch, pad_id
from kedit.hooks import trace

__all__ = [
    "Encoded",
    "encode_with_subject",
    "sample_context_templates",
    "gather_at",
    "compute_keys",
    "SubjectNotFoundError",
    "target_ids",
]


class SubjectNotFoundError(ValueError):
    """The subject's characters map to no token of the tokenized prompt."""


@dataclass
class Encoded:
    """Token ids of one prompt (no padding) and the index of the subject's last token."""

    ids: list[int]
    subject_last: int


def _subject_last(offsets: Sequence[tuple[int, int]], start: int, end: int) -> int:
    last = -1
    for i, (a, b) in enumerate(offsets):
        if b > a and a < end and b > start:
            last = i
    return last


def encode_with_subject(tok, texts: Sequence[str], spans: Sequence[tuple[int, int]]) -> list[Encoded]:
    """Tokenize each text (with the tokenizer's usual special tokens) and locate the subject's last token.

    Args:
        texts: full prompts.
        spans: ``(start, end)`` character span of the subject inside each text.
    """
    if len(texts) != len(spans):
        raise ValueError("texts and spans must have the same length")
    enc = tok(list(texts), return_offsets_mapping=True, add_special_tokens=True)
    out = []
    for i, (text, (s, e)) in enumerate(zip(texts, spans)):
        idx = _subject_last(enc["offset_mapping"][i], s, e)
        if idx < 0:
            raise SubjectNotFoundError(
                f"subject {text[s:e]!r} maps to no token of {text!r} (tokenizer {type(tok).__name__})"
            )
        out.append(Encoded(list(enc["input_ids"][i]), idx))
    return out


def target_ids(tok, target: str) -> list[int]:
    """Token ids of ``" " + target`` without special tokens (a leading BOS/UNK some tokenizers add is dropped)."""
    ids = tok(" " + target.strip(), add_special_tokens=False)["input_ids"]
    specials = {tok.bos_token_id, tok.unk_token_id} - {None}
    while ids and ids[0] in specials and len(ids) > 1:
        ids = ids[1:]
    if not ids:
        raise ValueError(f"target {target!r} tokenizes to nothing")
    return list(ids)


def gather_at(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``hidden[b, index[b]]`` for a ``[B, T, d]`` tensor."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index.to(hidden.device)]


@torch.no_grad()
def sample_context_templates(
    model: nn.Module,
    tok,
    *,
    lengths: Sequence[tuple[int, int]] = ((5, 5), (10, 5)),
    seeds: Sequence[str] = ("The", "Therefore", "Because", "I", "You"),
    top_k: int = 5,
    seed: int = 0,
) -> list[str]:
    """``["{}"] + [sampled_prefix + ". {}"]``: for each ``(n_tokens, count)`` in ``lengths``, ``count`` prefixes of
    ``n_tokens`` sampled tokens, each started from one of ``seeds`` (cycled). Braces are stripped from the
    sampled text so templates always contain exactly one ``{}``.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    device = device_of(model)
    templates = ["{}"]
    for n_tokens, count in lengths:
        starts = [seeds[i % len(seeds)] for i in range(count)]
        seqs = [tok(s, add_special_tokens=True)["input_ids"] for s in starts]
        for _ in range(n_tokens):
            ids, mask = pad_batch(seqs, pad_id(tok), device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            last = logits[torch.arange(len(seqs), device=logits.device), mask.sum(1).to(logits.device) - 1].cpu()
            top = last.topk(top_k, dim=-1)
            probs = torch.softmax(top.values, dim=-1)
            pick = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            for i, s in enumerate(seqs):
                s.append(int(top.indices[i, pick[i]]))
        for s in seqs:
            text = tok.decode(s, skip_special_tokens=True).replace("{", " ").replace("}", " ").strip()
            templates.append(text + ". {}")
    return templates


@torch.no_grad()
def compute_keys(
    model: nn.Module,
    tok,
    adapter: ArchAdapter,
    layers: Sequence[int],
    texts: Sequence[str],
    spans: Sequence[tuple[int, int]],
    *,
    batch_size: int = 64,
    with_outputs: bool = False,
) -> dict[int, torch.Tensor] | tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Keys (inputs of ``mlp_out``) at the subject's last token, for every layer in one forward per batch.

    Returns ``{layer: Tensor[n, d_k]}`` in fp32 (and, with ``with_outputs``, the ``mlp_out`` outputs too).
    """
    enc = encode_with_subject(tok, texts, spans)
    paths = {layer: adapter.path("mlp_out", layer) for layer in layers}
    keys: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    outs: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    device = device_of(model)
    for b in range(0, len(enc), batch_size):
        chunk = enc[b : b + batch_size]
        ids, mask = pad_batch([e.ids for e in chunk], pad_id(tok), device)
        idx = torch.tensor([e.subject_last for e in chunk], device=device)
        with trace(model, list(paths.values()), retain_input=True, retain_output=with_outputs, stop=True) as tr:
            model(input_ids=ids, attention_mask=mask)
        for layer, path in paths.items():
            keys[layer].append(gather_at(tr[path].input, idx).float())
            if with_outputs:
                outs[layer].append(gather_at(tr[path].output, idx).float())
    k = {layer: torch.cat(v) for layer, v in keys.items()}
    if with_outputs:
        return k, {layer: torch.cat(v) for layer, v in outs.items()}
    return k
