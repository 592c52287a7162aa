"""Batched measurement: turn requests into probes and measure them on a model (teacher-forced scores, greedy
generations, perplexity) -- never one prompt per forward pass when a batch fits.

* Teacher forcing builds ``ids = tok(prompt) ⊕ target_ids(tok, answer)`` (the prompt with the tokenizer's usual
  special tokens, the answer as ``" " + answer`` without them, as the ROME/MEMIT code does), right-pads a batch of
  them (:func:`kedit.core.batching.pad_batch`) sorted by length, and reads the log-probabilities and argmaxes at the
  answer positions.
* Generation uses :func:`kedit.api.greedy_answers` (left-padded, batched ``generate``).
* Perplexity sums token NLLs over a fixed text set.

:func:`observe` returns one :class:`~kedit.eval.metrics.Observation` per request; the metric registry reduces them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kedit.api import greedy_answers
from kedit.core.batching import device_of, pad_batch, pad_id
from kedit.core.keys import target_ids
from kedit.eval.metrics import GROUPS, Observation, ProbeResult, TFScore
from kedit.requests import EditRequest

__all__ = ["ProbeSpec", "ScoringConfig", "fluency_prompts", "observe", "probe_specs", "score_answers", "text_nll"]


@dataclass(frozen=True)
class ScoringConfig:
    """How records are measured.

    Attributes:
        batch_size: prompts per forward pass (1 = one prompt at a time, only for benchmarks).
        max_new_tokens: minimum length of the greedy continuations used by exact match and locality; a record
            whose longest answer (any group, in tokens) needs more gets ``that + 2`` -- decided per record, so the
            pre- and post-edit continuations of a record always have the same length and no answer is cut off.
        fluency_tokens: length of the greedy generations scored by n-gram entropy (0 disables fluency).
        fluency_prompts: at most this many generation prompts per record.
    """

    batch_size: int = 64
    max_new_tokens: int = 8
    fluency_tokens: int = 32
    fluency_prompts: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be ≥ 1")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be ≥ 1")


@dataclass(frozen=True)
class ProbeSpec:
    """One prompt to measure: its group, acceptable answers, and which CounterFact scores it needs."""

    group: str
    prompt: str
    answers: tuple[str, ...] = ()
    score_true: str | None = None  # also score this answer (target_true) -- CounterFact ES/PS
    score_new: str | None = None  # also score this answer (target_new) -- CounterFact NS


def _dedupe(items: Sequence[str | None]) -> tuple[str, ...]:
    out: list[str] = []
    for x in items:
        if isinstance(x, str) and x.strip() and x.strip() not in out:
            out.append(x.strip())
    return tuple(out)


def _aligned(extra: Any, key: str, i: int) -> list[str]:
    vals = extra.get(key) if hasattr(extra, "get") else None
    if isinstance(vals, list) and i < len(vals) and isinstance(vals[i], list):
        return [v for v in vals[i] if isinstance(v, str)]
    return []


def probe_specs(req: EditRequest) -> dict[str, list[ProbeSpec]]:
    """The probes of one request, by group (see :data:`kedit.eval.metrics.GROUPS`).

    Acceptable answers: ``target_new`` plus ``extra["target_aliases"]`` for the edit-prompt groups; a probe's
    ``answer`` plus the aligned ``extra["neighborhood_answers"][i]`` / ``extra["portability_answers"][i]`` lists.
    Portability probes without an answer are skipped (nothing to check them against)."""
    extra = req.extra or {}
    new_answers = _dedupe([req.target_new, *list(extra.get("target_aliases", []) or [])])
    edit_prompts = {
        "rewrite": [req.text],
        "paraphrase": list(req.paraphrases),
        "alias": [req.prompt.replace("{}", a, 1) for a in req.aliases],
    }
    out: dict[str, list[ProbeSpec]] = {
        g: [ProbeSpec(g, p, new_answers, score_true=req.target_true) for p in prompts]
        for g, prompts in edit_prompts.items()
    }
    out["neighborhood"] = [
        ProbeSpec("neighborhood", p.prompt, _dedupe([p.answer, *_aligned(extra, "neighborhood_answers", i)]),
                  score_new=req.target_new)
        for i, p in enumerate(req.neighborhood)
    ]
    out["portability"] = [
        ProbeSpec("portability", p.prompt, _dedupe([p.answer, *_aligned(extra, "portability_answers", i)]))
        for i, p in enumerate(req.portability)
        if p.answer is not None
    ]
    return out


def fluency_prompts(req: EditRequest, limit: int) -> list[str]:
    """CounterFact ``generation_prompts`` (first ``limit``) if the record has them, else the edit prompt."""
    gen = (req.extra or {}).get("generation_prompts")
    prompts = [g for g in gen if isinstance(g, str) and g.strip()] if isinstance(gen, list) else []
    return (prompts or [req.text])[: max(limit, 0)]


@torch.no_grad()
def score_answers(
    model: nn.Module, tok, pairs: Sequence[tuple[str, str]], *, batch_size: int = 64
) -> list[TFScore]:
    """Teacher-forced log-probabilities and argmaxes of each ``answer`` after its ``prompt``, batched.

    Pairs are processed in length-sorted batches of ``batch_size`` (right padding), results in input order.
    """
    if not pairs:
        return []
    device = device_of(model)
    pid = pad_id(tok)
    prompt_cache: dict[str, list[int]] = {}
    answer_cache: dict[str, list[int]] = {}
    enc: list[tuple[list[int], list[int]]] = []
    for prompt, answer in pairs:
        if prompt not in prompt_cache:
            prompt_cache[prompt] = list(tok(prompt, add_special_tokens=True)["input_ids"])
        if answer not in answer_cache:
            answer_cache[answer] = target_ids(tok, answer)
        p, a = prompt_cache[prompt], answer_cache[answer]
        if not p:
            raise ValueError(f"prompt {prompt!r} tokenizes to nothing")
        enc.append((p, a))
    order = sorted(range(len(enc)), key=lambda i: len(enc[i][0]) + len(enc[i][1]))
    out: list[TFScore | None] = [None] * len(enc)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        ids, mask = pad_batch([enc[i][0] + enc[i][1] for i in idx], pid, device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        rows, cols, tgts = [], [], []
        for r, i in enumerate(idx):
            p, a = enc[i]
            rows += [r] * len(a)
            cols += list(range(len(p) - 1, len(p) + len(a) - 1))
            tgts += a
        sel = logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)].float()
        logp = torch.log_softmax(sel, dim=-1)
        tgt = torch.tensor(tgts, device=logits.device)
        lp = logp.gather(1, tgt[:, None]).squeeze(1).cpu().tolist()
        am = logp.argmax(-1).cpu().tolist()
        pos = 0
        for i in idx:
            n = len(enc[i][1])
            out[i] = TFScore(tuple(lp[pos : pos + n]), tuple(int(x) for x in am[pos : pos + n]), tuple(enc[i][1]))
            pos += n
    return [s for s in out if s is not None]


def _max_len(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return 1024


@torch.no_grad()
def text_nll(model: nn.Module, tok, texts: Sequence[str], *, batch_size: int = 64) -> tuple[float, int]:
    """``(Σ NLL, number of predicted tokens)`` of ``texts`` (each truncated to the model's context), batched."""
    device = device_of(model)
    limit = _max_len(model)
    enc = [list(tok(t, add_special_tokens=True)["input_ids"])[:limit] for t in texts]
    enc = [e for e in enc if len(e) >= 2]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    total, count = 0.0, 0
    for b in range(0, len(order), batch_size):
        seqs = [enc[i] for i in order[b : b + batch_size]]
        ids, mask = pad_batch(seqs, pad_id(tok), device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(2, ids[:, 1:, None]).squeeze(2)
        m = mask[:, 1:].to(logp.dtype)
        total += float(-(logp * m).sum().double())
        count += int(m.sum())
    return total, count


def record_new_tokens(tok, by_group: dict[str, list[ProbeSpec]], minimum: int) -> int:
    """Greedy-continuation length for one record: ``max(minimum, longest answer in tokens + 2)``."""
    longest = max(
        (len(target_ids(tok, a)) for specs in by_group.values() for s in specs for a in s.answers if a.strip()),
        default=0,
    )
    return max(minimum, longest + 2)


def generate(
    model: nn.Module, tok, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int, full_length: bool = False
) -> list[str]:
    """Greedy continuations (:func:`kedit.api.greedy_answers`) computed in length-sorted batches (less padding),
    returned in input order."""
    if not prompts:
        return []
    lengths = [len(ids) for ids in tok(list(prompts), add_special_tokens=True)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    gens = greedy_answers(model, tok, [prompts[i] for i in order], max_new_tokens=max_new_tokens,
                          batch_size=batch_size, full_length=full_length)
    out = [""] * len(prompts)
    for i, g in zip(order, gens):
        out[i] = g
    return out


def observe(
    model: nn.Module,
    tok,
    requests: Sequence[EditRequest],
    config: ScoringConfig = ScoringConfig(),
    *,
    pre: Sequence[Observation] | None = None,
    perplexity: float | None = None,
) -> list[Observation]:
    """Measure every probe of ``requests`` on ``model`` as it is now.

    ``pre``: the pre-edit observations of the same requests; a neighbourhood probe without a known answer is then
    teacher-forced on its *pre-edit* greedy continuation (so pre and post score the same tokens). Without ``pre``
    (i.e. when measuring the pre-edit model) the probe's own continuation is used.
    """
    specs = [probe_specs(r) for r in requests]
    flat: list[tuple[int, str, int, ProbeSpec]] = [
        (ri, g, pi, s) for ri, by_group in enumerate(specs) for g in GROUPS for pi, s in enumerate(by_group.get(g, []))
    ]
    need = [record_new_tokens(tok, by_group, config.max_new_tokens) for by_group in specs]
    gen_of: dict[tuple[int, str, int], str] = {}
    for length in sorted(set(need)):
        part = [(ri, g, pi, s) for ri, g, pi, s in flat if need[ri] == length]
        gens = generate(model, tok, [s.prompt for *_, s in part], max_new_tokens=length, batch_size=config.batch_size)
        gen_of.update({(ri, g, pi): text for (ri, g, pi, _), text in zip(part, gens)})

    flu_prompts = [fluency_prompts(r, config.fluency_prompts) if config.fluency_tokens > 0 else [] for r in requests]
    flu_flat = [p for ps in flu_prompts for p in ps]
    flu_gens = generate(model, tok, flu_flat, max_new_tokens=config.fluency_tokens, batch_size=config.batch_size,
                        full_length=True)

    # teacher-forced jobs: (key, prompt, answer)
    jobs: list[tuple[tuple[int, str, int, str], str, str]] = []
    for ri, g, pi, s in flat:
        answer: str | None = s.answers[0] if s.answers else None
        if answer is None and g == "neighborhood":
            src = pre[ri].group(g)[pi].generation if pre is not None else gen_of[(ri, g, pi)]
            answer = src.strip() or None
        if answer is not None:
            jobs.append(((ri, g, pi, "tf"), s.prompt, answer))
        if s.score_true is not None:
            jobs.append(((ri, g, pi, "true"), s.prompt, s.score_true))
        if s.score_new is not None:
            jobs.append(((ri, g, pi, "new"), s.prompt, s.score_new))
    scores = score_answers(model, tok, [(p, a) for _, p, a in jobs], batch_size=config.batch_size)
    by_key = {key: sc for (key, _, _), sc in zip(jobs, scores)}

    out: list[Observation] = []
    pos = 0
    for ri, by_group in enumerate(specs):
        groups: dict[str, tuple[ProbeResult, ...]] = {}
        for g in GROUPS:
            probes = []
            for pi, s in enumerate(by_group.get(g, [])):
                tf = by_key.get((ri, g, pi, "tf"))
                tf_new = by_key.get((ri, g, pi, "new"))
                if tf_new is None and g in ("rewrite", "paraphrase", "alias"):
                    tf_new = tf  # the canonical answer IS target_new
                probes.append(ProbeResult(s.prompt, s.answers, gen_of[(ri, g, pi)], tf, tf_new,
                                          by_key.get((ri, g, pi, "true"))))
            groups[g] = tuple(probes)
        n = len(flu_prompts[ri])
        out.append(Observation(groups, tuple(flu_gens[pos : pos + n]), perplexity))
        pos += n
    return out
