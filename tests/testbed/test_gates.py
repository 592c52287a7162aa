"""Greedy generation of the testbed gates (and kedit's own batched ``generate`` path) runs without any library
warning: a deprecated cache argument or output (transformers 5 renames ``past_key_values`` to ``cache``) would
fail these tests."""

from __future__ import annotations

import contextlib
import logging
import random
import warnings

import pytest

from kedit.testbed import load_testbed_model, load_world
from kedit.testbed.gates import greedy_generate, recall
from kedit.testbed.world import trained_pairs


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _no_library_warnings():
    """Every Python warning raises; WARNING records of the (non-propagating) ``transformers`` logger are collected.
    ``warning_once`` remembers what it said in this process, so its memory is cleared first."""
    clear = getattr(getattr(logging.Logger, "warning_once", None), "cache_clear", None)
    if clear is not None:
        clear()
    handler = _Records()
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield handler.records
    finally:
        hf_logger.removeHandler(handler)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_generate_warns_nothing_and_matches_recall(arch):
    model, tok = load_testbed_model(arch)
    pairs = random.Random(2).sample([(t.format(s), o) for _, s, t, o in trained_pairs(load_world())], 24)
    # a long prompt next to short ones: left padding and the per-row positions matter
    prompts = [p for p, _ in pairs]
    with _no_library_warnings() as records:
        gen = greedy_generate(model, tok, prompts, max_new_tokens=6, batch_size=16)
    assert [r.getMessage() for r in records] == []
    _, hits = recall(model, tok, pairs, return_hits=True)
    assert any(hits)
    for (p, o), g, h in zip(pairs, gen, hits):
        assert g.startswith(f" {o}.") == h, (p, o, g, h)
    # the cached decoding equals decoding without a cache (full forward over the growing sequence)
    import torch

    ids = [tok.bos_token_id] + tok(prompts[0], add_special_tokens=False)["input_ids"]
    steps = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            steps.append(nxt)
            ids.append(nxt)
    assert gen[0] == tok.decode(steps)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_generate_warns_nothing(arch):
    """``kedit.api.greedy_answers`` (the evaluation's generation, through ``model.generate``) is warning-free."""
    from kedit.api import greedy_answers

    model, tok = load_testbed_model(arch)
    prompts = [t.format(s) for _, s, t, _ in trained_pairs(load_world())[:5]]
    with _no_library_warnings() as records:
        out = greedy_answers(model, tok, prompts, max_new_tokens=4)
        full = greedy_answers(model, tok, prompts, max_new_tokens=4, full_length=True)
    assert [r.getMessage() for r in records] == []
    assert len(out) == len(full) == len(prompts) and all(isinstance(x, str) for x in out)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_past_end_of_text_warns_nothing(arch):
    """Prompts of one length (no padding, so transformers drops the all-ones mask) decoded past the end of text:
    the finished rows are fed the pad id, which for the testbed is also bos/eos. With a model config that declared
    that id as its pad token, transformers guessed "padded input without a mask" and warned on every eval run; the
    testbed models' config declares no pad token (as GPT-2's and Llama's own configs), kedit pads with the
    tokenizer's id and always passes the mask."""
    from kedit.api import greedy_answers

    model, tok = load_testbed_model(arch)
    assert model.config.pad_token_id is None
    by_len: dict[int, list[str]] = {}
    for _, s, t, _ in trained_pairs(load_world())[:400]:
        p = t.format(s)
        by_len.setdefault(len(tok(p)["input_ids"]), []).append(p)
    prompts = max(by_len.values(), key=len)[:8]
    assert len(prompts) >= 2
    with _no_library_warnings() as records:
        out = greedy_answers(model, tok, prompts, max_new_tokens=12)
    assert [r.getMessage() for r in records] == []
    assert any(len(o) > 0 for o in out)
