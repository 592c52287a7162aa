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

__all__ = [
    "TESTBED_MODELS",
    "EditResult",
    "PromptTooLongError",
    "answers_match",
    "context_window",
    "edit",
    "greedy_answers",
    "load_model",
    "record_label",
    "request_too_long",
    "rollback_bytes",
]

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
    tok = AutoTokenizer.from_pretrained(
        name, **{k: v for k, v in kwargs.items() if k in ("revision", "local_files_only")}
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
    if device is not None:
        model = model.to(device)
    return model.eval(), tok


class PromptTooLongError(ValueError):
    """A request's prompt (with what an edit or a measurement appends) does not fit the model's context window."""


def record_label(index: int, case_id: str | None = None) -> str:
    """How errors name a record: ``case <case_id> (record <n>)``, else ``record <n>`` -- ``n`` is the 1-based
    position in the given request list."""
    return f"case {case_id} (record {index + 1})" if case_id is not None else f"record {index + 1}"


def context_window(model: nn.Module) -> int | None:
    """The number of positions ``model`` accepts (``n_positions`` / ``max_position_embeddings`` / ...), or ``None``
    when its config does not say."""
    cfg = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _n_tokens(tok, text: str) -> int:
    # verbose=False: counting is how we find over-long prompts, the tokenizer need not warn about them
    return len(tok(text, add_special_tokens=True, verbose=False)["input_ids"])


def request_too_long(
    model: nn.Module,
    tok,
    request: EditRequest,
    *,
    reserve: int = 0,
    new_tokens: int = 0,
    probes: bool = False,
) -> str | None:
    """Why ``request`` does not fit ``model``'s context window, or ``None`` if it fits.

    Counted: the prompt's tokens plus the target's plus ``reserve`` (e.g. the longest context-template prefix a
    method prepends), and the prompt plus ``new_tokens`` generated. With ``probes`` every paraphrase,
    neighbourhood and portability prompt is counted too (plus its answer and ``new_tokens``), as evaluation
    feeds each of them to the model.
    """
    window = context_window(model)
    if window is None:
        return None
    n_prompt = _n_tokens(tok, request.text)
    n_target = len(target_ids(tok, request.target_new))
    worst = (max(n_prompt + n_target + reserve, n_prompt + new_tokens), "prompt")
    if probes:
        texts = [(p, 0) for p in request.paraphrases]
        texts += [(p.prompt, len(target_ids(tok, p.answer)) if p.answer else 0) for p in request.neighborhood]
        texts += [(p.prompt, len(target_ids(tok, p.answer)) if p.answer else 0) for p in request.portability]
        for text, n_answer in texts:
            n = _n_tokens(tok, text)
            worst = max(worst, (max(n + n_answer, n + new_tokens, n + n_target), "a probe prompt"))
    if worst[0] > window:
        return (f"too long: {worst[1]} needs {worst[0]} tokens, more than the model's context window of "
                f"{window}")
    return None


def _template_reserve(cfg: Any) -> int:
    """Tokens a method's context templates can prepend (the longest sampled prefix, its seed word and ". ")."""
    lengths = getattr(cfg, "context_lengths", None) or ()
    return max((int(n) for n, _ in lengths), default=0) + 4 if lengths else 0


def rollback_bytes(deltas: Sequence[EditDelta]) -> int:
    """Bytes held for exact rollback by the applied ``deltas`` (``EditDelta.rollback_bytes`` where available, else
    the size of the original tensors each applied delta keeps)."""
    total = 0
    for d in deltas:
        n = getattr(d, "rollback_bytes", None)
        if n is None:
            state = getattr(d, "_state", None)
            originals = getattr(state, "originals", None) or {}
            n = sum(t.numel() * t.element_size() for t in originals.values())
        total += int(n)
    return total


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
    """Outcome of :func:`edit`: the applied deltas (one per batch, in order), per-request success, timings.

    ``success[i]`` is measured after the whole sequence of edits; ``immediate[i]`` (with ``immediate=True``) right
    after request ``i``'s own edit (its batch's, for batched methods). ``errors`` maps the index of each request
    that was skipped (too long, or its edit failed with ``on_error="record"``) to the reason; skipped requests count
    as not successful.
    """

    method: str
    deltas: list[EditDelta]
    requests: list[EditRequest]
    success: list[bool] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    immediate: list[bool] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)

    @property
    def success_rate(self) -> float:
        return sum(self.success) / len(self.success) if self.success else float("nan")

    @property
    def immediate_success_rate(self) -> float:
        return sum(self.immediate) / len(self.immediate) if self.immediate else float("nan")

    @property
    def rollback_bytes(self) -> int:
        """Bytes held for exact rollback (see :func:`rollback_bytes`)."""
        return rollback_bytes([d for d in self.deltas if d.is_applied])

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
    immediate: bool = False,
    on_error: str = "raise",
) -> EditResult:
    """Edit ``model`` with ``requests`` using ``method``.

    Requests are processed in batches of ``batch_size`` (default: all at once for batched methods); each batch's
    delta is computed on the model with the previous batches applied (sequential editing) and applied when
    ``apply`` is true. ``config`` is a config dataclass or a dict of overrides on the architecture preset.
    With ``evaluate``, success = the greedy continuation of each request's prompt starts with ``target_new``
    (``max_new_tokens`` defaults to the longest target's token count + 2, so long targets are never cut off),
    measured after all edits.

    ``immediate``: also measure each request right after its own edit (:attr:`EditResult.immediate`). A method that
    edits one request at a time (``MethodSpec.batched`` false: ROME, r-ROME) then gets one compute call -- and one
    delta -- per request unless ``batch_size`` is given; the edits are the same as in one call, which also applies
    its requests one after another.

    ``on_error``: ``"raise"`` (default) or ``"record"``: a request that does not fit the context window, or a batch
    whose edit fails, is skipped with a logged reason (:attr:`EditResult.errors`) and the others go on. Requests
    that do not fit are found before any edit is computed. Errors name the record (:func:`record_label`).
    """
    if on_error not in ("raise", "record"):
        raise ValueError(f"on_error must be 'raise' or 'record', got {on_error!r}")
    spec = get_method(method)
    reqs = as_requests(list(requests))
    if not reqs:
        raise ValueError("no edit requests given")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if config is None or isinstance(config, Mapping):
        cfg = spec.make_config(config, base=spec.default_config(model))
    elif isinstance(config, spec.config):
        cfg = config
    else:
        raise TypeError(f"config for {spec.name} must be a {spec.config.__name__} or a dict")
    ctx = ctx or EditContext()
    if max_new_tokens is None:
        max_new_tokens = max(len(target_ids(tok, r.target_new)) for r in reqs) + 2
    result = EditResult(method=spec.name, deltas=[], requests=reqs)
    reserve = _template_reserve(cfg)
    for i, r in enumerate(reqs):
        reason = request_too_long(model, tok, r, reserve=reserve,
                                  new_tokens=max_new_tokens if (evaluate or immediate) else 0)
        if reason is None:
            continue
        if on_error == "raise":
            raise PromptTooLongError(f"{record_label(i, r.case_id)}: {reason}")
        log.warning("skipping %s: %s", record_label(i, r.case_id), reason)
        result.errors[i] = reason
    active = [i for i in range(len(reqs)) if i not in result.errors]
    if batch_size is not None:
        size = batch_size
    elif immediate and not spec.batched:
        size = 1
    else:
        size = max(len(active), 1)
    if not apply and size < len(active):
        raise ValueError("sequential batches need apply=True (each batch is computed on the edited model)")
    immediate_ok: dict[int, bool] = {}
    t0 = time.perf_counter()
    compute_s = 0.0
    try:
        for b in range(0, len(active), size):
            idx = active[b : b + size]
            batch = [reqs[i] for i in idx]
            tc = time.perf_counter()
            try:
                delta = spec.compute(model, tok, batch, cfg, ctx)
            except Exception as e:
                names = ", ".join(record_label(i, reqs[i].case_id) for i in idx[:5]) + (", ..." if len(idx) > 5 else "")
                if on_error == "raise":
                    e.kedit_records = names  # type: ignore[attr-defined]  # read by the CLI to name the record
                    raise
                reason = f"edit failed: {type(e).__name__}: {e}"
                log.warning("skipping %s: %s", names, reason)
                result.errors.update({i: reason for i in idx})
                continue
            finally:
                compute_s += time.perf_counter() - tc
            if apply:
                delta.apply(model)
            result.deltas.append(delta)
            if immediate and apply:
                answers = greedy_answers(model, tok, [r.text for r in batch], max_new_tokens=max_new_tokens)
                immediate_ok.update({i: answers_match(a, reqs[i].target_new) for i, a in zip(idx, answers)})
    except BaseException:
        result.revert(model)  # nothing half-applied
        raise
    result.timings["compute_s"] = compute_s
    result.timings["edit_s"] = time.perf_counter() - t0
    if immediate and apply:
        result.immediate = [immediate_ok.get(i, False) for i in range(len(reqs))]
    if evaluate and apply:
        te = time.perf_counter()
        ok = [i for i in range(len(reqs)) if i not in result.errors]
        answers = dict(zip(ok, greedy_answers(model, tok, [reqs[i].text for i in ok], max_new_tokens=max_new_tokens)))
        result.answers = [answers.get(i, "") for i in range(len(reqs))]
        result.success = [i in answers and answers_match(answers[i], r.target_new) for i, r in enumerate(reqs)]
        result.timings["eval_s"] = time.perf_counter() - te
    return result
