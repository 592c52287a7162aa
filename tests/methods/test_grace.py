"""GRACE (kedit.methods.grace) and its side memory (kedit.memory): edits, locality, removal by id, exact revert,
persistence, bad input, the expand / split rules, padding."""

from __future__ import annotations

import copy

import pytest
import torch
from memory_common import logits as _logits
from memory_common import no_memory as _no_memory
from memory_common import state as _state

import kedit
from kedit.api import greedy_answers
from kedit.core.batching import pad_batch, pad_id
from kedit.deltas import EditDelta, MemoryEntryUpdate, load_delta
from kedit.memory import (
    MEMORY_CONFIG,
    MEMORY_TENSORS,
    EditMemoryError,
    MemoryFormatError,
    Record,
    UnknownEditError,
    edit_ids,
    fold,
    get_memory,
    load_memory,
    remove_edit,
    save_memory,
)
from kedit.requests import RequestError
from kedit.testbed import load_testbed_model


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_edit_gives_target_on_both_testbed_models(which, request, reqs):
    model, tok = request.getfixturevalue(which)
    before = _state(model)
    res = kedit.edit(model, tok, reqs[:4], method="grace")
    try:
        assert res.success == [True] * 4, res.answers
        assert len(edit_ids(model)) == 4 and len(set(edit_ids(model))) == 4
        # the weights were never touched
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    finally:
        res.revert(model)
    _no_memory(model)


def test_unrelated_prompt_bitwise_and_full_revert(gpt2, reqs):
    model, tok = gpt2
    before = _state(model)
    unrelated = "Yesterday the weather in the valley was"
    base = _logits(model, tok, unrelated)
    base_answers = greedy_answers(model, tok, [r.text for r in reqs[:5]])
    res = kedit.edit(model, tok, reqs[:5], method="grace")
    assert get_memory(model)
    assert torch.equal(_logits(model, tok, unrelated), base)
    res.revert(model)
    _no_memory(model)
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(_logits(model, tok, unrelated), base)
    assert greedy_answers(model, tok, [r.text for r in reqs[:5]]) == base_answers


def test_remove_from_the_middle_of_twenty(gpt2, reqs):
    model, tok = gpt2
    prompts = [r.text for r in reqs]
    mid = 9
    pre_logits = _logits(model, tok, prompts[mid])
    pre_answer = greedy_answers(model, tok, [prompts[mid]])[0]
    res = kedit.edit(model, tok, reqs, method="grace")
    try:
        ids = edit_ids(model)
        assert len(ids) == 20
        after = greedy_answers(model, tok, prompts)
        assert res.success[mid] and sum(res.success) >= 19
        remove_edit(model, ids[mid])
        assert ids[mid] not in edit_ids(model) and len(edit_ids(model)) == 19
        assert torch.equal(_logits(model, tok, prompts[mid]), pre_logits)  # bitwise pre-edit
        now = greedy_answers(model, tok, prompts)
        assert now[mid] == pre_answer
        assert [a for i, a in enumerate(now) if i != mid] == [a for i, a in enumerate(after) if i != mid]
    finally:
        res.revert(model)  # the removed id is skipped, the others go
    _no_memory(model)


def test_single_edit_deltas_revert_in_any_order(gpt2, reqs):
    model, tok = gpt2
    base = greedy_answers(model, tok, [r.text for r in reqs[:3]])
    res = kedit.edit(model, tok, reqs[:3], method="grace", immediate=True)
    assert len(res.deltas) == 3 and all(d.is_memory for d in res.deltas)
    res.deltas[1].revert(model)  # not LIFO: memory entries are removed by id
    now = greedy_answers(model, tok, [r.text for r in reqs[:3]])
    assert now[1] == base[1] and res.success[0] and res.success[2]
    res.deltas[0].revert(model)
    res.deltas[2].revert(model)
    _no_memory(model)


def test_save_load_fresh_model_and_refusals(gpt2, llama, reqs, tmp_path):
    model, tok = gpt2
    res = kedit.edit(model, tok, reqs[:6], method="grace")
    probes = [r.text for r in reqs[:8]] + [p for r in reqs[:3] for p in r.paraphrases[:1]]
    try:
        answers = greedy_answers(model, tok, probes)
        save_memory(model, tmp_path / "mem")
        res.deltas[0].save(tmp_path / "delta")
    finally:
        res.revert(model)
    fresh, ftok = load_testbed_model("gpt2")
    ids = load_memory(fresh, tmp_path / "mem")
    assert len(ids) == 6
    assert greedy_answers(fresh, ftok, probes) == answers
    with pytest.raises(EditMemoryError, match="already has a memory"):
        load_memory(fresh, tmp_path / "mem")
    assert edit_ids(fresh) == ids
    # a saved delta applies to a fresh model too (same answers), and reverts to nothing
    fresh2, _ = load_testbed_model("gpt2")
    delta = load_delta(tmp_path / "delta")
    assert delta.is_memory and isinstance(delta.updates[0], MemoryEntryUpdate)
    delta.apply(fresh2)
    assert greedy_answers(fresh2, ftok, probes) == answers
    delta.revert(fresh2)
    _no_memory(fresh2)
    # another base model: refused, nothing installed
    other, _ = llama
    with pytest.raises(MemoryFormatError, match="another base model"):
        load_memory(other, tmp_path / "mem")
    _no_memory(other)
    # truncated tensors / config: refused naming the file
    t = (tmp_path / "mem" / MEMORY_TENSORS).read_bytes()
    (tmp_path / "mem" / MEMORY_TENSORS).write_bytes(t[: len(t) // 2])
    fresh3, _ = load_testbed_model("gpt2")
    with pytest.raises(MemoryFormatError, match=MEMORY_TENSORS):
        load_memory(fresh3, tmp_path / "mem")
    c = (tmp_path / "mem" / MEMORY_CONFIG).read_text()
    (tmp_path / "mem" / MEMORY_CONFIG).write_text(c[: len(c) // 2])
    with pytest.raises(MemoryFormatError, match=MEMORY_CONFIG):
        load_memory(fresh3, tmp_path / "mem")
    _no_memory(fresh3)


def test_bad_input_leaves_memory_unchanged(gpt2, reqs):
    model, tok = gpt2
    res = kedit.edit(model, tok, reqs[:2], method="grace")
    try:
        ids = edit_ids(model)
        book = next(iter(get_memory(model).values()))
        keys = book.keys.clone()
        with pytest.raises(UnknownEditError, match="nope"):
            remove_edit(model, "nope")
        with pytest.raises(RequestError, match="non-empty"):
            kedit.edit(model, tok, [dict(reqs[2].to_dict(), target_new="")], method="grace")
        with pytest.raises(RequestError, match="Nobody Atall"):
            kedit.edit(model, tok, [dict(reqs[2].to_dict(), prompt=reqs[2].text, subject="Nobody Atall")],
                       method="grace")
        # applying the same delta twice (a copy: same edit ids) is refused whole
        with pytest.raises(EditMemoryError, match="already in the memory"):
            res.deltas[0].copy().apply(model)
        assert edit_ids(model) == ids and torch.equal(get_memory(model)[book.module_path].keys, keys)
    finally:
        res.revert(model)
    _no_memory(model)


def _rec(i, key, label, eps=1.0):
    return Record(f"e{i}", torch.tensor(key, dtype=torch.float32), torch.zeros(2), label, eps)


def test_expand_and_split_rules():
    # far apart: two entries of radius ε₀
    entries, _ = fold([_rec(0, [0.0, 0.0], "A"), _rec(1, [5.0, 0.0], "B")])
    assert [(e.creator, e.radius) for e in entries] == [("e0", 1.0), ("e1", 1.0)]
    # same target inside the ball's reach (d = 1.5 ≤ ε₀ + ε): expand to cover, no new entry
    entries, _ = fold([_rec(0, [0.0, 0.0], "A"), _rec(1, [1.5, 0.0], "A")])
    assert len(entries) == 1 and entries[0].radius == pytest.approx(1.5) and entries[0].owners == ["e0", "e1"]
    # different target: split the radii to d / 2
    entries, _ = fold([_rec(0, [0.0, 0.0], "A"), _rec(1, [1.5, 0.0], "B")])
    assert [(e.creator, e.radius) for e in entries] == [("e0", pytest.approx(0.75)), ("e1", pytest.approx(0.75))]


def test_a_split_never_drops_an_expanded_owner():
    # e1 joins e0's ball by expansion (same target, d = 1.5); e2 (another target, d = 1 from e0, 2.5 from e1)
    # splits it to 0.5: e1's key would be outside every ball, so it gets its own entry
    entries, keys = fold([_rec(0, [0.0, 0.0], "A"), _rec(1, [1.5, 0.0], "A"), _rec(2, [-1.0, 0.0], "B")])
    by = {e.creator: e for e in entries}
    assert set(by) == {"e0", "e1", "e2"} and by["e0"].owners == ["e0"] and by["e1"].owners == ["e1"]
    assert by["e0"].radius == pytest.approx(0.5) and by["e2"].radius == pytest.approx(0.5)
    assert by["e1"].radius == pytest.approx(1.0)  # min(ε₀, ‖k1 − k2‖ / 2 = 1.25)
    # every record's key is inside a ball answering its own target
    labels = {"e0": "A", "e1": "A", "e2": "B"}
    for rid, k in (("e0", [0.0, 0.0]), ("e1", [1.5, 0.0]), ("e2", [-1.0, 0.0])):
        d = torch.linalg.vector_norm(torch.stack(keys) - torch.tensor(k), dim=1)
        j = int(d.argmin())
        assert float(d[j]) <= entries[j].radius and labels[entries[j].creator] == labels[rid]
    # an owner the shrunk ball still covers stays an owner
    entries, _ = fold([_rec(0, [0.0, 0.0], "A"), _rec(1, [0.3, 0.0], "A"), _rec(2, [-1.5, 0.0], "B")])
    assert len(entries) == 2 and entries[0].owners == ["e0", "e1"]


def test_span_replaces_the_target_positions_in_teacher_forcing_and_kv_cached_decoding(gpt2, llama, reqs):
    """The value replaces the layer output at the last prompt token and the target positions after it -- in one
    teacher-forced forward and, carried by the root pre-hook, in each KV-cached decode step -- and nowhere else."""
    from kedit.core.keys import target_ids

    req = max(reqs[:20], key=lambda r: len(r.target_new))  # a long (multi-token) target
    for model, tok in (gpt2, llama):
        res = kedit.edit(model, tok, [req], method="grace")
        try:
            book = next(iter(get_memory(model).values()))
            span = int(book.spans[0])
            prompt, tgt = tok(req.text)["input_ids"], target_ids(tok, req.target_new)
            assert span == len(tgt) > 1
            module = model.get_submodule(book.module_path)
            seen = []
            h = module.register_forward_hook(lambda m, a, o, seen=seen: seen.append(o.detach().clone()))
            try:
                ids = torch.tensor([prompt + tgt + tgt])  # runs on past the span
                with torch.no_grad():
                    model(input_ids=ids)
                replaced = (seen[-1][0] == book.values[0]).all(dim=-1).nonzero().flatten().tolist()
                last = len(prompt) - 1
                assert replaced == list(range(last, last + span))
                # KV-cached greedy decoding: the prefill replaces the last prompt position, then span - 1 steps
                seen.clear()
                out = model.generate(torch.tensor([prompt]), max_new_tokens=span + 3, do_sample=False,
                                     pad_token_id=tok.eos_token_id)
            finally:
                h.remove()
            steps = [bool((o[0, -1] == book.values[0]).all()) for o in seen]
            assert steps == [True] * span + [False] * (len(steps) - span)
            assert out[0, len(prompt): len(prompt) + len(tgt)].tolist() == tgt
        finally:
            res.revert(model)
        _no_memory(model)


def test_a_reedit_of_the_same_key_replaces_the_entry():
    # the same key with another label: the split rule would leave two balls of radius 0; the newest edit wins
    entries, keys = fold([_rec(0, [3.0, 4.0], "A"), _rec(1, [3.0, 4.0], "B")])
    assert len(entries) == 1 and entries[0].creator == "e1" and entries[0].radius == 1.0
    assert entries[0].owners == ["e0", "e1"]
    # a key merely near (not equal): still the paper's split
    entries, _ = fold([_rec(0, [3.0, 4.0], "A"), _rec(1, [3.0, 4.01], "B")])
    assert len(entries) == 2 and entries[0].radius == pytest.approx(0.005, rel=1e-4)


def test_reedit_newest_target_wins_and_removal_brings_the_older_back(gpt2, reqs):
    model, tok = gpt2
    r = reqs[0]
    pre = greedy_answers(model, tok, [r.text])[0]
    newer = reqs[1].target_new if reqs[1].target_new != r.target_new else reqs[2].target_new
    a = kedit.edit(model, tok, [r], method="grace")
    b = kedit.edit(model, tok, [r.with_target(newer)], method="grace")
    try:
        assert kedit.api.answers_match(greedy_answers(model, tok, [r.text])[0], newer)
        b.revert(model)
        assert kedit.api.answers_match(greedy_answers(model, tok, [r.text])[0], r.target_new)
    finally:
        if b.deltas[0].is_applied:
            b.revert(model)
        a.revert(model)
    assert greedy_answers(model, tok, [r.text])[0] == pre
    _no_memory(model)


def test_expand_split_through_the_codebook_and_removal_never_widens(gpt2, reqs):
    model, tok = gpt2
    cfg = {"epsilon": 50.0}  # wider than the testbed keys' spread: the second key falls inside the first ball
    a = kedit.edit(model, tok, [reqs[0]], method="grace", config=cfg)
    try:
        _expand_split(model, tok, reqs, cfg)
    finally:
        a.revert(model)
    _no_memory(model)


def _expand_split(model, tok, reqs, cfg):
    b = kedit.edit(model, tok, [reqs[1].with_target(reqs[0].target_new)], method="grace", config=cfg)
    book = next(iter(get_memory(model).values()))
    assert len(book.entries) == 1 and len(book.entries[0].owners) == 2  # same target: expand
    assert book.entries[0].radius == 50.0  # already covered: the radius stays
    b.revert(model)
    assert book.entries[0].owners == [edit_ids(model)[0]]
    other = reqs[2].target_new
    assert other != reqs[0].target_new
    c = kedit.edit(model, tok, [reqs[1].with_target(other)], method="grace", config=cfg)
    d01 = float(torch.linalg.vector_norm(book.keys[0] - book.keys[1]))
    assert len(book.entries) == 2  # different target: split
    assert book.entries[0].radius == pytest.approx(d01 / 2) and book.entries[1].radius == pytest.approx(d01 / 2)
    assert kedit.api.answers_match(greedy_answers(model, tok, [reqs[1].text])[0], other)
    assert kedit.api.answers_match(greedy_answers(model, tok, [reqs[0].text])[0], reqs[0].target_new)
    split = book.entries[0].radius
    c.revert(model)
    assert book.entries[0].radius == split  # a removal never widens a surviving ball


def test_padded_batches_equal_one_at_a_time(gpt2, llama, reqs):
    for model, tok in (gpt2, llama):
        res = kedit.edit(model, tok, reqs[:3], method="grace")
        try:
            prompts = [r.text for r in reqs[:3]] + ["A short one", reqs[5].text]
            one = [greedy_answers(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
            assert greedy_answers(model, tok, prompts, max_new_tokens=6) == one  # left padded, KV cache
            # right padded forward: each row's real positions give the edited logits of the row alone
            enc = [tok(p)["input_ids"] for p in prompts]
            ids, mask = pad_batch(enc, pad_id(tok), side="right")
            with torch.no_grad():
                batch = model(input_ids=ids, attention_mask=mask).logits
            for i, e in enumerate(enc):
                alone = _logits(model, tok, prompts[i])[0]
                assert torch.equal(batch[i, : len(e)].argmax(-1), alone.argmax(-1))
                torch.testing.assert_close(batch[i, : len(e)], alone, atol=1e-4, rtol=1e-4)
        finally:
            res.revert(model)
        _no_memory(model)


def test_memory_delta_keeps_weight_deltas_apart(gpt2, reqs):
    model, tok = gpt2
    d = kedit.edit(model, tok, reqs[:1], method="grace", apply=False, evaluate=False).deltas[0]
    assert d.is_memory and d.fingerprints == {} and not d.is_applied
    u = d.updates[0]
    with pytest.raises(ValueError, match="not both"):
        from kedit.deltas import DenseUpdate

        EditDelta([u, DenseUpdate("lm_head.weight", torch.zeros(2, 2))])
    with pytest.raises(ValueError, match="epsilon"):
        MemoryEntryUpdate(u.param, u.key, u.value, dict(u.info, epsilon=0))
    assert copy.deepcopy(d.config)["layer"] == 3
