"""Quality gates of the testbed models, measured with greedy decoding.

Recall of a (prompt, object) pair means: greedy decoding after ``prompt`` produces exactly ``" " + object``
followed by the full stop that ends every training sentence. Because greedy decoding picks the arg-max token at
every step, this is checked exactly (and much faster than step-by-step generation) with ONE batched forward pass
over ``prompt + " " + object + "."``: the pair is recalled iff the arg-max at every object/full-stop position
equals the gold token (ties aside). :func:`greedy_generate` does real step-by-step batched decoding for
inspection; the test suite checks that both agree.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Sequence
from typing import Any

from .world import World, filler_sentences, heldout_pairs, trained_pairs, two_hop_pairs

__all__ = [
    "GATE_TARGETS",
    "MICRO_GATE_TARGETS",
    "evaluate_gates",
    "greedy_generate",
    "heldout_filler",
    "in_context_pairs",
    "perplexity",
    "recall",
    "weights_digest",
]

logger = logging.getLogger(__name__)

GATE_TARGETS = {"recall_trained": 0.97, "recall_heldout": 0.80, "recall_in_context": 0.90}
# The micro testbed (unit tests, ~1 minute to build) trades held-out generalisation for speed.
# The micro GPT-2 (d=64, learned positions) recalls only ~72 % of the facts after a prefix; the micro Llama ~99 %.
MICRO_GATE_TARGETS = {"recall_trained": 0.95, "recall_heldout": 0.40, "recall_in_context": 0.60}
CONTEXT_KINDS = ("filler", "fact", "filler+fact")


def recall(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 256,
    return_hits: bool = False,
) -> float | tuple[float, list[bool]]:
    """Fraction of ``(prompt, object)`` pairs for which greedy decoding yields ``" object."``."""
    import torch

    from kedit.core.batching import device_of, pad_batch, pad_id

    if not pairs:
        return (float("nan"), []) if return_hits else float("nan")
    bos = tokenizer.bos_token_id
    pad = pad_id(tokenizer)
    p_ids = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    f_ids = tokenizer([f"{p} {o}." for p, o in pairs], add_special_tokens=False)["input_ids"]
    dev = device_of(model)
    hits: list[bool] = []
    order = sorted(range(len(pairs)), key=lambda i: len(f_ids[i]))
    res: dict[int, bool] = {}
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            ids, mask = pad_batch([[bos] + f_ids[i] for i in idx], pad)
            pred = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.argmax(-1).cpu()
            for r, i in enumerate(idx):
                start = len(p_ids[i]) + 1  # position of the first object token in [bos] + f_ids
                end = len(f_ids[i]) + 1
                gold = ids[r, start:end]
                guess = pred[r, start - 1 : end - 1]
                res[i] = bool(torch.equal(gold, guess))
    hits = [res[i] for i in range(len(pairs))]
    score = sum(hits) / len(hits)
    return (score, hits) if return_hits else score


def _cache_kwarg(model: Any) -> str:
    """Name of the forward argument that takes a KV cache: ``cache`` (transformers >= 5.x, which deprecates
    ``past_key_values``) or ``past_key_values`` (4.x)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def greedy_generate(
    model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 8, batch_size: int = 128
) -> list[str]:
    """Batched greedy decoding (left-padded, with KV cache); returns the decoded continuations.

    The cache is a :class:`transformers.DynamicCache` made here and filled in place by every forward call (under
    the argument name the installed transformers expects), so no deprecated cache argument or output is used."""
    import torch
    from transformers import DynamicCache

    from kedit.core.batching import device_of, pad_batch, pad_id

    bos = tokenizer.bos_token_id
    pad = pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    enc = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    dev = device_of(model)
    cache_kw = _cache_kwarg(model)
    out: list[str] = [""] * len(prompts)
    with torch.no_grad():
        for s in range(0, len(enc), batch_size):
            ids, mask = pad_batch([[bos] + e for e in enc[s : s + batch_size]], pad, dev, side="left")
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            cache = DynamicCache()
            res = model(
                input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_kw: cache}
            )
            nxt = res.logits[:, -1].argmax(-1)
            gen = [nxt]
            done = nxt == eos
            last_pos = pos[:, -1]
            for _ in range(max_new_tokens - 1):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                last_pos = last_pos + 1
                res = model(
                    input_ids=nxt[:, None],
                    attention_mask=mask,
                    position_ids=last_pos[:, None],
                    use_cache=True,
                    **{cache_kw: cache},
                )
                nxt = res.logits[:, -1].argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                gen.append(nxt)
                done = done | (nxt == eos)
                if bool(done.all()):
                    break
            toks = torch.stack(gen, 1).cpu().tolist()
            for r, t in enumerate(toks):
                if eos in t:
                    t = t[: t.index(eos)]
                out[s + r] = tokenizer.decode(t)
    return out


def perplexity(model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 128) -> float:
    """Token-level perplexity of ``texts`` (each as ``bos text eos``)."""
    import torch

    from kedit.core.batching import device_of, pad_batch, pad_id

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = pad_id(tokenizer)
    enc = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    dev = device_of(model)
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(enc), batch_size):
            ids, mask = pad_batch([[bos] + e + [eos] for e in enc[s : s + batch_size]], pad)
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float().cpu()
            lp = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="none"
            )
            m = mask[:, 1:].reshape(-1).float()
            tot += float((lp * m).sum())
            cnt += int(m.sum())
    return math.exp(tot / max(1, cnt))


def heldout_filler(world: World, n: int = 300) -> list[str]:
    """Filler sentences from an RNG stream not used in training (for perplexity)."""
    train = set(world.filler)
    cand = filler_sentences(world, n * 3, random.Random(world.seed * 7919 + 99991))
    return [s for s in cand if s not in train][:n]


def in_context_pairs(
    world: World, pairs: Sequence[tuple[str, str, str, str]], seed: int = 0
) -> list[tuple[str, str, str]]:
    """``(kind, prefixed prompt, object)`` for trained ``(relation, subject, template, object)`` pairs, each preceded
    (after one space) by a held-out filler sentence, a trained fact sentence of another subject, or both (kind
    chosen round-robin, prefixes drawn from ``random.Random(seed)``)."""
    rng = random.Random(seed * 7919 + 424242)
    filler = heldout_filler(world)
    facts = trained_pairs(world)
    out = []
    for i, (_, s, t, o) in enumerate(pairs):
        kind = CONTEXT_KINDS[i % len(CONTEXT_KINDS)]
        parts = []
        if "filler" in kind:
            parts.append(rng.choice(filler))
        if "fact" in kind:
            while True:
                _, s2, t2, o2 = rng.choice(facts)
                if s2 != s:
                    break
            parts.append(f"{t2.format(s2)} {o2}.")
        out.append((kind, " ".join(parts + [t.format(s)]), o))
    return out


def _sample(items: list, n: int | None, seed: int) -> list:
    if n is None or n >= len(items):
        return items
    return random.Random(seed).sample(items, n)


def evaluate_gates(
    model: Any,
    tokenizer: Any,
    world: World,
    *,
    max_pairs: int | None = None,
    seed: int = 0,
    targets: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Measure every gate figure; ``max_pairs`` subsamples each pair set (deterministically). ``passed`` compares
    with ``targets`` (default :data:`GATE_TARGETS`)."""
    targets = targets or GATE_TARGETS
    tr_all = _sample(trained_pairs(world), max_pairs, seed)
    tr = [(t.format(s), o) for _, s, t, o in tr_all]
    ctx = in_context_pairs(world, tr_all, seed)
    ctx_score, ctx_hits = recall(model, tokenizer, [(p, o) for _, p, o in ctx], return_hits=True)
    by_kind: dict[str, list[bool]] = {}
    for (kind, *_), hit in zip(ctx, ctx_hits):
        by_kind.setdefault(kind, []).append(hit)
    ho_all = _sample(heldout_pairs(world), max_pairs, seed)
    ho = [(t.format(s), o) for _, s, t, o in ho_all]
    th_tr = _sample([(t.format(s), o) for _, s, t, o in two_hop_pairs(world, trained=True)], max_pairs, seed)
    th_ho = _sample([(t.format(s), o) for _, s, t, o in two_hop_pairs(world, trained=False)], max_pairs, seed)
    ho_score, ho_hits = recall(model, tokenizer, ho, return_hits=True)
    by_rel: dict[str, list[bool]] = {}
    for (rel, *_), hit in zip(ho_all, ho_hits):
        by_rel.setdefault(rel, []).append(hit)
    out = {
        "recall_trained": float(recall(model, tokenizer, tr)),
        "recall_heldout": float(ho_score),
        "recall_heldout_by_relation": {r: round(sum(h) / len(h), 4) for r, h in sorted(by_rel.items())},
        "recall_in_context": float(ctx_score),
        "recall_in_context_by_prefix": {k: round(sum(h) / len(h), 4) for k, h in sorted(by_kind.items())},
        "two_hop_trained": float(recall(model, tokenizer, th_tr)),
        "two_hop_heldout": float(recall(model, tokenizer, th_ho)),
        "perplexity_heldout_filler": perplexity(model, tokenizer, heldout_filler(world)),
        "n_trained_pairs": len(tr),
        "n_heldout_pairs": len(ho),
    }
    out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}
    out["passed"] = bool(all(out[k] >= v for k, v in targets.items()))
    return out


def weights_digest(model: Any) -> str:
    """sha256 over the model's state dict (names, shapes, dtypes and bytes) — the determinism check helper."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
