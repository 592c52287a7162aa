"""WISE (kedit.methods.wise) and its side memory (kedit.memory.side): edits, routing of unedited inputs to the main
memory, exact revert, removal by id, persistence, bad input, TIES merge and random masks."""

from __future__ import annotations

import pytest
import torch
from memory_common import logits as _logits
from memory_common import no_memory as _no_memory
from memory_common import state as _state

import kedit
from kedit.api import answers_match, greedy_answers
from kedit.deltas import EditDelta
from kedit.memory import (
    MEMORY_CONFIG,
    MEMORY_TENSORS,
    EditMemoryError,
    MemoryFormatError,
    SideMemory,
    UnknownEditError,
    edit_ids,
    get_memory,
    load_memory,
    remove_edit,
    save_memory,
)
from kedit.memory.side import shard_mask, ties_merge, trim
from kedit.requests import RequestError
from kedit.testbed import load_testbed_model


def _side(model) -> SideMemory:
    (mem,) = [m for m in get_memory(model).values() if isinstance(m, SideMemory)]
    return mem


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_edit_gives_target_on_both_testbed_models(which, request, reqs):
    model, tok = request.getfixturevalue(which)
    before = _state(model)
    # requests the testbed:20 tuning converged on for both models
    picked = [reqs[0], reqs[1], reqs[3]]
    res = kedit.edit(model, tok, picked, method="wise")
    try:
        assert res.success == [True] * 3, res.answers
        assert len(set(edit_ids(model))) == 3
        mem = _side(model)
        assert mem.module_path.endswith(".3.mlp.c_proj" if which == "gpt2" else ".3.mlp.down_proj")
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    finally:
        res.revert(model)
    _no_memory(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unedited_inputs_go_to_main_memory_bitwise_and_full_revert(gpt2, reqs):
    model, tok = gpt2
    before = _state(model)
    texts = ["Yesterday the weather in the valley was", "The river flows", reqs[10].text,
             reqs[12].neighborhood[0].prompt, reqs[0].neighborhood[0].prompt, reqs[1].paraphrases[0]]
    base = [_logits(model, tok, t) for t in texts]
    res = kedit.edit(model, tok, reqs[:3], method="wise")
    mem = _side(model)
    routed = []
    for t, b in zip(texts, base):
        after = _logits(model, tok, t)
        score, go = float(mem.last_scores[0]), bool(mem.last_route[0])
        assert go == (score > 1.0)  # the best ratio Δ_act_m / ε_m over the memories
        routed.append(go)
        if not go:  # the router sent it to the main memory: bitwise the unedited model's output
            assert torch.equal(after, b), t
        else:
            assert not torch.equal(after, b), t
    assert routed[:2] == [False, False]  # generic text goes to the main memory
    # an edited prompt scores above the threshold and is changed
    edited = _logits(model, tok, reqs[0].text)
    assert float(mem.last_scores[0]) > 1.0 and not torch.equal(edited, _logits_plain(model, tok, reqs[0]))
    res.revert(model)
    _no_memory(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for t, b in zip(texts, base):
        assert torch.equal(_logits(model, tok, t), b)


def _logits_plain(model, tok, req):
    mem = _side(model)
    mem.suspended = True
    try:
        return _logits(model, tok, req.text)
    finally:
        mem.suspended = False


def test_remove_middle_edit_restores_it_and_keeps_the_others(gpt2, reqs):
    model, tok = gpt2
    picked = reqs[:6]
    prompts = [r.text for r in picked]
    pre = greedy_answers(model, tok, prompts)
    res = kedit.edit(model, tok, picked, method="wise")
    try:
        post = greedy_answers(model, tok, prompts)
        ok = [answers_match(a, r.target_new) for a, r in zip(post, picked)]
        assert sum(ok) >= 5, post
        ids = edit_ids(model)
        remove_edit(model, ids[2])
        assert edit_ids(model) == ids[:2] + ids[3:]
        after = greedy_answers(model, tok, prompts)
        assert after[2] == pre[2]  # the removed fact is back to its pre-edit answer
        assert [a for i, a in enumerate(after) if i != 2] == [a for i, a in enumerate(post) if i != 2]
        # the memory of the remaining edits is exactly the one they build alone (re-merged from the records)
        alone = SideMemory(_side(model).module_path, _side(model).d_in, _side(model).d_out)
        alone.add([_side(model).records[i] for i in edit_ids(model)])
        assert alone.deltas.keys() == _side(model).deltas.keys()
        assert all(torch.equal(alone.deltas[m], _side(model).deltas[m]) for m in alone.deltas)
        assert alone.eps == _side(model).eps
    finally:
        res.revert(model)  # the removed id is skipped
    _no_memory(model)


def test_save_load_fresh_model_and_refusals(gpt2, llama, reqs, tmp_path):
    model, tok = gpt2
    probes = [r.text for r in reqs[:4]] + [reqs[0].paraphrases[0], reqs[15].text, "The river flows"]
    res = kedit.edit(model, tok, reqs[:4], method="wise")
    try:
        answers = greedy_answers(model, tok, probes)
        save_memory(model, tmp_path / "mem")
    finally:
        res.revert(model)
    fresh, ftok = load_testbed_model("gpt2")
    ids = load_memory(fresh, tmp_path / "mem")
    assert len(ids) == 4
    assert greedy_answers(fresh, ftok, probes) == answers
    cfg = (tmp_path / "mem" / MEMORY_CONFIG).read_text()
    assert '"kind": "wise"' in cfg and "base_model_fingerprint" in cfg
    other, _ = llama
    with pytest.raises(MemoryFormatError, match="another base model"):
        load_memory(other, tmp_path / "mem")
    _no_memory(other)
    t = (tmp_path / "mem" / MEMORY_TENSORS).read_bytes()
    (tmp_path / "mem" / MEMORY_TENSORS).write_bytes(t[: len(t) // 2])
    fresh2, _ = load_testbed_model("gpt2")
    with pytest.raises(MemoryFormatError, match=MEMORY_TENSORS):
        load_memory(fresh2, tmp_path / "mem")
    (tmp_path / "mem" / MEMORY_CONFIG).write_text(cfg[: len(cfg) // 2])
    with pytest.raises(MemoryFormatError, match=MEMORY_CONFIG):
        load_memory(fresh2, tmp_path / "mem")
    _no_memory(fresh2)


def test_bad_input_leaves_memory_unchanged(gpt2, reqs):
    model, tok = gpt2
    res = kedit.edit(model, tok, reqs[:2], method="wise")
    try:
        ids = edit_ids(model)
        delta, thr = {m: d.clone() for m, d in _side(model).deltas.items()}, dict(_side(model).eps)
        with pytest.raises(UnknownEditError, match="nope"):
            remove_edit(model, "nope")
        with pytest.raises(RequestError, match="non-empty"):
            kedit.edit(model, tok, [dict(reqs[2].to_dict(), target_new="")], method="wise")
        with pytest.raises(RequestError, match="Nobody Atall"):
            kedit.edit(model, tok, [dict(reqs[2].to_dict(), prompt=reqs[2].text, subject="Nobody Atall")],
                       method="wise")
        with pytest.raises(EditMemoryError, match="already in the memory"):
            res.deltas[0].copy().apply(model)
        # a shard that does not fit the layer (another model's) is refused whole, naming the edit
        u, v = res.deltas[0].updates
        bad = EditDelta([type(u)(u.param + "x", u.key, u.value, dict(u.info, edit_id="fine")),
                         type(v)(v.param + "x", v.key, v.value[:-1], dict(v.info, edit_id="foreign"))])
        with pytest.raises(EditMemoryError, match="foreign"):
            bad.apply(model)
        assert edit_ids(model) == ids
        assert all(torch.equal(_side(model).deltas[m], d) for m, d in delta.items()) and _side(model).eps == thr
    finally:
        res.revert(model)
    _no_memory(model)


def test_ties_merge_by_hand():
    idx = torch.tensor([0, 1, 2, 3])
    a = torch.tensor([3.0, -1.0, 0.5, 2.0])
    b_idx = torch.tensor([1, 2, 3, 4])
    b = torch.tensor([2.0, -4.0, 1.0, -0.1])
    # trim to density 0.5: a keeps 3.0 and 2.0; b keeps -4.0 and 2.0
    assert torch.equal(trim(a, 0.5), torch.tensor([3.0, 0.0, 0.0, 2.0]))
    merged = ties_merge([(idx, a), (b_idx, b)], 6, density=0.5)
    # b trimmed: (2, -4, 0, 0) at 1..4; elected signs of the sums (3, 2, -4, 2, 0): +, +, -, +; each entry has one
    # non-zero agreeing value
    assert torch.equal(merged, torch.tensor([3.0, 2.0, -4.0, 2.0, 0.0, 0.0]))
    # no trim: sign election drops the minority, disjoint mean averages the agreeing ones
    m = ties_merge([(idx, a), (b_idx, b)], 6, density=1.0)
    # 0: 3; 1: -1 and 2 -> sum + -> 2; 2: 0.5 and -4 -> sum - -> -4; 3: 2 and 1 -> mean 1.5; 4: -0.1
    assert torch.allclose(m, torch.tensor([3.0, 2.0, -4.0, 1.5, -0.1, 0.0]))
    # one shard: returned as it is (nothing to resolve)
    assert torch.equal(ties_merge([(idx, a)], 5, density=0.5), torch.tensor([3.0, -1.0, 0.5, 2.0, 0.0]))


def test_random_masks_reproducible_by_seed():
    m1, m2, m3 = shard_mask(7, 1000, 0.2), shard_mask(7, 1000, 0.2), shard_mask(8, 1000, 0.2)
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    assert m1.numel() == 200 and m1.unique().numel() == 200 and bool((m1[1:] > m1[:-1]).all())
    assert int(m1.max()) < 1000 and int(m1.min()) >= 0


def test_edit_is_deterministic_and_shard_stays_on_mask(gpt2, reqs):
    model, tok = gpt2
    d1 = kedit.edit(model, tok, reqs[:1], method="wise", apply=False, evaluate=False).deltas[0]
    d2 = kedit.edit(model, tok, reqs[:1], method="wise", apply=False, evaluate=False).deltas[0]
    u1, u2 = d1.updates[0], d2.updates[0]
    assert u1.info["mask_seed"] == u2.info["mask_seed"] and torch.equal(u1.value, u2.value)
    assert u1.edit_id != u2.edit_id
    d1.apply(model)
    try:
        mem = _side(model)
        mask = shard_mask(u1.info["mask_seed"], mem.d_in * mem.d_out, u1.info["mask_ratio"])
        flat = mem.deltas[0].reshape(-1)
        off = torch.ones_like(flat, dtype=torch.bool)
        off[mask] = False
        assert bool((flat[off] == 0).all()) and bool((flat[mask] != 0).any())
    finally:
        d1.revert(model)
    _no_memory(model)


def test_padded_batch_equals_one_at_a_time(gpt2, llama, reqs):
    # the router scores a row's real tokens only (padding excluded) and keeps the prefill's choice for the decode
    # steps: a left-padded KV-cached batch gives every row what it gives alone
    for model, tok in (gpt2, llama):
        res = kedit.edit(model, tok, reqs[:2], method="wise")
        try:
            prompts = [r.text for r in reqs[:2]] + ["A short one", reqs[5].text, reqs[0].paraphrases[0]]
            one = [greedy_answers(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
            assert greedy_answers(model, tok, prompts, max_new_tokens=6) == one
            assert answers_match(one[0], reqs[0].target_new)
        finally:
            res.revert(model)
        _no_memory(model)


def test_memories_fill_to_capacity_a_subject_stays_in_its_memory_and_compute_reads_without_writing(gpt2, reqs):
    model, tok = gpt2
    by_subject = {}
    for r in reqs:
        by_subject.setdefault(r.subject, r)
    picked = list(by_subject.values())[:5]
    assert len(picked) == 5
    cfg = {"edits_per_memory": 2}
    res = kedit.edit(model, tok, picked[:4], method="wise", config=cfg)
    try:
        mem = _side(model)
        assert [mem.memory_of(i) for i in edit_ids(model)] == [0, 0, 1, 1]
        assert [int(mem.records[i].info["shard"]) for i in edit_ids(model)] == [0, 1, 0, 1]
        snap = ({m: d.clone() for m, d in mem.deltas.items()}, dict(mem.eps), list(mem.records))
        # a new subject opens memory 2; a new fact about the first subject goes to memory 0 (computed, not applied)
        again = dict(picked[0].to_dict(), prompt="The favourite colour of {} is", target_new="Rere",
                     target_true=None, paraphrases=[], neighborhood=[])
        d = kedit.edit(model, tok, [picked[4], again], method="wise", config=cfg, apply=False,
                       evaluate=False).deltas[0]
        assert [u.info["memory"] for u in d.updates] == [2, 0]
        assert d.updates[1].info["shard"] == 0  # the memory's third edit: round-robin over 2 shards
        # compute read the live memory and left it (and the model's answers) exactly as they were
        assert list(mem.records) == snap[2] and mem.eps == snap[1]
        assert all(torch.equal(mem.deltas[m], x) for m, x in snap[0].items())
        # each memory is the TIES merge of its shards' summed residuals, computed by hand from the records
        for m in mem.deltas:
            ids = [i for i in edit_ids(model) if mem.memory_of(i) == m]
            shards = []
            for s in (0, 1):
                rs = [mem.records[i] for i in ids if int(mem.records[i].info["shard"]) == s]
                if rs:
                    idx = shard_mask(rs[0].info["mask_seed"], mem.d_in * mem.d_out, rs[0].info["mask_ratio"])
                    shards.append((idx, sum(r.value for r in rs)))
            want = ties_merge(shards, mem.d_in * mem.d_out, float(mem.records[ids[0]].info["density"]))
            assert torch.allclose(mem.deltas[m].reshape(-1).cpu(), want, atol=0, rtol=0)
    finally:
        res.revert(model)
    _no_memory(model)


def test_sequential_edits_are_retained_and_a_re_edit_wins(gpt2, reqs):
    # one edit at a time, each computed on the live memory (the lifelong protocol's k = 1): the earlier edits keep
    # their answers; a re-edit of the first fact goes to its memory and the newest target wins
    model, tok = gpt2
    picked = reqs[:8]
    results = []
    try:
        for r in picked:
            results.append(kedit.edit(model, tok, [r], method="wise", evaluate=False))
        answers = greedy_answers(model, tok, [r.text for r in picked])
        kept = [answers_match(a, r.target_new) for a, r in zip(answers, picked)]
        assert sum(kept) >= 7, answers
        first = picked[0]
        new_target = picked[5].target_new if picked[5].target_new != first.target_new else picked[6].target_new
        re = kedit.edit(model, tok, [dict(first.to_dict(), target_new=new_target)], method="wise",
                        evaluate=False)
        results.append(re)
        mem = _side(model)
        assert re.deltas[0].updates[0].info["memory"] == mem.memory_of(edit_ids(model)[0])
        assert answers_match(greedy_answers(model, tok, [first.text])[0], new_target)
    finally:
        for res in reversed(results):
            res.revert(model)
    _no_memory(model)


def test_random_prefix_contexts_are_trained_and_reproducible(gpt2, reqs):
    # the paper's augmented contexts: the target NLL is also taken after short corpus prefixes, so the side memory
    # (applied on every position, as in training) gives the target after each of them too; the same seed draws
    # the same prefixes
    from kedit.arch import get_adapter
    from kedit.core.context import EditContext
    from kedit.methods.wise import WISEConfig, _corpus, _hash, _prefixes, _suspended
    from kedit.methods.wise import _side as side_hook

    model, tok = gpt2
    req = reqs[0]
    spec = kedit.get_method("wise")
    cfg = spec.make_config({"n_prefixes": 3}, base=spec.default_config(model))
    texts = _corpus(EditContext(), model, "t")
    seed = _hash(cfg.seed, req.text, req.target_new)
    pre = _prefixes(texts, cfg, seed)
    assert pre == _prefixes(texts, cfg, seed) and len(pre) == 3
    assert all(p.endswith(".") and len(p.split()) <= cfg.prefix_words for p in pre)
    assert _prefixes(texts, WISEConfig(n_prefixes=0), seed) == []
    prompts = [f"{p} {req.text}" for p in pre]
    res = kedit.edit(model, tok, [req], method="wise", config={"n_prefixes": 3}, evaluate=False)
    try:
        mem = _side(model)
        module = get_adapter(model).module(model, "mlp_out", cfg.layer)
        with _suspended(mem), side_hook(module, lambda: mem.deltas[0]):
            got = greedy_answers(model, tok, prompts)
        assert all(answers_match(g, req.target_new) for g in got), got
    finally:
        res.revert(model)
    _no_memory(model)
    with pytest.raises(ValueError, match="n_prefixes"):
        WISEConfig(n_prefixes=-1)


def _prompt_acts(model, tok, module, texts):
    """The side-memory layer's input activations ``[T, 640]`` of each text (one forward each)."""
    acts = []
    h = module.register_forward_hook(lambda mod, a, o: acts.append(a[0][0].detach().clone()))
    try:
        with torch.no_grad():
            for t in texts:
                model(input_ids=torch.tensor([tok(t)["input_ids"]]))
    finally:
        h.remove()
    return acts


def _synthetic_memories(tok, path, texts, acts, n, g, *, seed0, tag, twin=None, extra=None):
    """``n`` one-edit WISE memories on real masks, keys = the prompts' own activations: noise plus a rank-one part
    that answers the memory's own prompt (so most prompts pick their own memory); memory ``n − 1`` is ``twin(memory
    0's value)`` when ``twin`` is given (a tie or near-tie), else memory ``(n − 1) % len(acts)``'s own."""
    from kedit.deltas import MemoryEntryUpdate

    centre = torch.stack([x.mean(0) for x in acts]).mean(0)
    n_mask = shard_mask(0, 640 * 160, 0.2).numel()
    updates = []
    for j in range(n):
        src = j % len(acts)
        ids = tok(texts[src])["input_ids"]
        mask = shard_mask(seed0 + src, 640 * 160, 0.2)
        aligned = torch.outer(torch.randn(160, generator=g), acts[src].mean(0) - centre).reshape(-1)[mask]
        value = (torch.randn(n_mask, generator=g) * 0.1 + aligned) * 5
        if twin is not None and j == n - 1:
            value = twin(updates[0].value)
        info = {"edit_id": f"{tag}{j}", "module": path, "label": f"l{j}", "epsilon": 1.0, "method": "wise",
                "mask_seed": seed0 + src, "mask_ratio": 0.2, "n_tokens": len(ids), "n_prompt": len(ids),
                "act_ratio": 0.88, "density": 0.8, "memory": j, "shard": 0, "tokens": ids + [ids[-1]],
                **(extra or {})}
        updates.append(MemoryEntryUpdate(f"{path}#wise:{tag}{j}", acts[src].reshape(-1), value, info))
    return updates


def test_router_decides_as_the_reference_einsum_on_many_memories(gpt2, reqs):
    # the router scores only the real tokens, in one product against the stacked ΔWᵀ (kedit.memory.side): on 41
    # live memories (synthetic residuals on real masks, keys = the prompts' own activations; memory 40 a copy of
    # memory 0, so that prompt's row is a tie) it picks the same memory per row, with the same ratio, and
    # generates the same tokens as the definition's einsum over every position (_reference_ratios)
    from kedit.arch import get_adapter
    from kedit.memory import add_entries, clear_memory
    from kedit.memory.side import _reference_ratios

    model, tok = gpt2
    adapter = get_adapter(model)
    path, module = adapter.path("mlp_out", 3), adapter.module(model, "mlp_out", 3)
    texts = [r.text for r in reqs] + [r.paraphrases[0] for r in reqs[:10]] + [r.neighborhood[0].prompt
                                                                               for r in reqs[:10]]
    acts = _prompt_acts(model, tok, module, texts[:40])
    g = torch.Generator().manual_seed(0)
    updates = _synthetic_memories(tok, path, texts, acts, 41, g, seed0=1000, tag="r", twin=lambda v: v.clone())
    plain = greedy_answers(model, tok, texts, max_new_tokens=5)
    add_entries(model, updates)
    try:
        mem = _side(model)
        assert len(mem.deltas) == 41 and torch.equal(mem.deltas[0], mem.deltas[40])
        # direct: random activations, a left-padded mask (one row all padding)
        a = torch.randn(6, 9, 640, generator=g)
        real = torch.ones(6, 9, dtype=torch.long)
        real[1, :4] = 0
        real[2, :8] = 0
        real[3] = 0
        for r in (real, None):
            got, want = mem.ratios(a, r), _reference_ratios(mem, a, r)
            assert torch.equal(got[1], want[1]) and torch.allclose(got[0], want[0], rtol=1e-6, atol=0)
        # generation: the same decisions per row and the same tokens, batched (left-padded) as the evaluation does
        seen = []
        fast = mem.ratios

        def spy(acts, real=None, fn=fast):
            out = fn(acts, real)
            seen.append(out)
            return out

        mem.ratios = spy
        live = greedy_answers(model, tok, texts, max_new_tokens=5)
        mem.ratios = lambda acts, real=None: spy(acts, real, fn=lambda x, m: _reference_ratios(mem, x, m))
        ref = greedy_answers(model, tok, texts, max_new_tokens=5)
        del mem.ratios
        assert live == ref
        assert len(seen) == 2
        (b_fast, id_fast), (b_ref, id_ref) = seen
        assert torch.equal(id_fast, id_ref) and torch.allclose(b_fast, b_ref, rtol=1e-6, atol=0)
        routed = id_fast[b_fast > 1.0]
        assert len(set(routed.tolist())) >= 15 and int((b_fast <= 1.0).sum()) >= 1
        # memories 0 and 40 tie in exact arithmetic on the first prompt: the rounding of the product decides, the
        # same way in both routers (checked above)
        assert int(id_fast[0]) in (0, 40)
        assert sum(x != y for x, y in zip(live, plain)) >= 5  # the memories answer
    finally:
        clear_memory(model)
    _no_memory(model)


def test_hard_cross_prompts_are_the_most_similar_and_zero_keeps_random_draws():
    # n_cross_similar picks the other memories' prompts closest (cosine of the mean prompt activation) to the new
    # edit's prompt; 0 is the random draw of before, element for element
    from types import SimpleNamespace

    from kedit.methods.wise import WISEConfig, _cross, _sample

    g = torch.Generator().manual_seed(3)
    d_in, recs = 12, {}
    for j in range(40):
        n_tok, n_p = 6, 4
        recs[f"e{j:02d}"] = SimpleNamespace(key=torch.randn(n_tok * d_in, generator=g),
                                            info={"n_tokens": n_tok, "n_prompt": n_p})
    state = SimpleNamespace(records=recs)
    others = sorted(recs)
    a_prompt = torch.randn(4, d_in, generator=g)
    assert _cross(state, others, a_prompt, WISEConfig(n_cross=10), 7) == _sample(others, 10, 7)
    assert _cross(state, others[:5], a_prompt, WISEConfig(n_cross=10, n_cross_similar=3), 7) == others[:5]
    got = _cross(state, others, a_prompt, WISEConfig(n_cross=10, n_cross_similar=4), 7)
    assert len(got) == len(set(got)) == 10
    q = a_prompt.double().mean(0)
    cos = {i: float(torch.nn.functional.cosine_similarity(
        recs[i].key.view(6, d_in)[:4].double().mean(0), q, dim=0)) for i in others}
    top = sorted(others, key=lambda i: -cos[i])[:4]
    assert set(got[:4]) == set(top)
    assert min(cos[i] for i in got[:4]) > max(cos[i] for i in others if i not in top)
    with pytest.raises(ValueError, match="n_cross_similar"):
        WISEConfig(n_cross=4, n_cross_similar=5)


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_bounded_router_bounds_hold_and_decisions_equal_the_reference(gpt2, reqs, pool):
    # the two-stage router (kedit.memory.side.MemoryState._bounded_ratios): its bf16 per-token bounds contain the
    # exact scores, its candidate set holds the exact argmax, and it decides as the definition's einsum on 30
    # memories (near-ties included: memory 29 is memory 0 scaled by 1 + 1e-4); a record without the setting routes
    # exactly. The same with the token scores pooled by their maximum (router_pool="max")
    from kedit.arch import get_adapter
    from kedit.memory import add_entries
    from kedit.memory.side import _reference_ratios

    model, tok = gpt2
    adapter = get_adapter(model)
    path, module = adapter.path("mlp_out", 3), adapter.module(model, "mlp_out", 3)
    texts = ([r.text for r in reqs] + [r.paraphrases[0] for r in reqs[:10]])[:29]
    acts = _prompt_acts(model, tok, module, texts)
    g = torch.Generator().manual_seed(1)
    updates = _synthetic_memories(tok, path, texts, acts, 30, g, seed0=2000, tag="b",
                                  twin=lambda v: v * (1 + 1e-4), extra={"router": "bounded", "pool": pool})
    add_entries(model, updates)
    try:
        mem = _side(model)
        assert mem.bounded and mem.pool == pool
        x = torch.cat(acts + [torch.randn(20, 640, generator=g)])
        order, dt, _ = mem.stack()
        exact = mem._token_scores(x, dt)
        lo, hi = mem.token_bounds(x)
        assert bool((lo <= exact).all()) and bool((exact <= hi).all())
        assert float(((hi - lo) / exact.clamp_min(1e-12)).median()) < 0.2  # tight enough to prune
        width = max(a.shape[0] for a in acts)
        batch = torch.zeros(len(acts), width, 640)
        real = torch.zeros(len(acts), width, dtype=torch.long)
        for i, a in enumerate(acts):  # left-padded, as generation pads
            batch[i, width - a.shape[0]:] = a
            real[i, width - a.shape[0]:] = 1
        ref_best, ref_ids = _reference_ratios(mem, batch, real)
        best, ids = mem.ratios(batch, real, bounded=True)
        cand = mem.last_candidates
        assert torch.equal(ids, ref_ids)
        assert torch.allclose(best, ref_best, rtol=1e-5)
        pos = {m: j for j, m in enumerate(order)}
        assert all(bool(cand[i, pos[int(m)]]) for i, m in enumerate(ref_ids))
        assert float(cand.float().sum(1).mean()) < len(order) / 2  # it does prune
        ex_best, ex_ids = mem.ratios(batch, real, bounded=False)
        assert torch.equal(ex_ids, ids) and torch.allclose(ex_best, best, rtol=1e-5)
        mem.records[next(iter(mem.records))].info.pop("router")
        assert not mem.bounded
    finally:
        from kedit.memory import clear_memory
        clear_memory(model)
    _no_memory(model)


def test_subject_loss_trains_the_memory_through_the_subject_positions(gpt2, reqs):
    # subject_loss: a second target NLL with the memory on the positions up to the subject's last token only; the
    # trained memory, restricted to those positions, still gives the target (later layers read it from the
    # subject), and the restricted hook leaves every later position of the layer's output bitwise unedited
    from kedit.arch import get_adapter
    from kedit.core.keys import encode_with_subject, target_ids
    from kedit.methods.wise import WISEConfig, _suspended
    from kedit.methods.wise import _side as side_hook

    model, tok = gpt2
    req = reqs[0]
    cfg = WISEConfig(layer=3)
    module = get_adapter(model).module(model, "mlp_out", cfg.layer)
    (enc,) = encode_with_subject(tok, [req.text], [req.subject_span])
    tgt = target_ids(tok, req.target_new)
    x = torch.tensor([enc.ids + tgt[:-1]])
    where = (torch.arange(x.shape[1]) <= enc.subject_last).unsqueeze(0)
    res = kedit.edit(model, tok, [req], method="wise", config={"subject_loss": 1.0}, evaluate=False)
    try:
        mem = _side(model)
        outs: dict[str, torch.Tensor] = {}

        def grab(name):
            def hook(mod, args, out):
                outs[name] = out.detach().clone()
            return hook

        with _suspended(mem):
            h = module.register_forward_hook(grab("base"))
            with torch.no_grad():
                model(input_ids=x)
            h.remove()
            with side_hook(module, lambda: mem.deltas[0], where=where), torch.no_grad():
                h = module.register_forward_hook(grab("subject"))
                pred = model(input_ids=x).logits[0, len(enc.ids) - 1:].argmax(-1)
                h.remove()
            assert torch.equal(outs["subject"][0, enc.subject_last + 1:], outs["base"][0, enc.subject_last + 1:])
            assert not torch.equal(outs["subject"][0, : enc.subject_last + 1], outs["base"][0, : enc.subject_last + 1])
        assert pred.tolist() == tgt  # teacher-forced: every target token is the argmax
    finally:
        res.revert(model)
    _no_memory(model)
    with pytest.raises(ValueError, match="subject_loss"):
        WISEConfig(subject_loss=-1.0)


def test_max_pool_router_edits_routes_by_the_token_maximum_and_refuses_a_mixed_pool(gpt2, reqs):
    # router_pool="max": every score is the maximum over the row's real tokens (thresholds included), the edits
    # answer, the router decides as the definition's einsum with the maximum, a row scores the same alone and
    # left-padded, and an edit or a record with the other pool is refused with the memory unchanged
    from kedit.deltas import MemoryEntryUpdate
    from kedit.memory import add_entries
    from kedit.memory.side import _reference_ratios, activation_score

    model, tok = gpt2
    picked = [reqs[0], reqs[1]]
    res = kedit.edit(model, tok, picked, method="wise", config={"router_pool": "max"})
    try:
        assert res.success == [True, True], res.answers
        mem = _side(model)
        assert mem.pool == "max" and all(r.info["pool"] == "max" for r in mem.records.values())
        for m, ids in mem.members.items():  # ε_m from the maximum over the stored tokens
            want = min(r.info["act_ratio"] * min(
                float(torch.linalg.vector_norm(a @ mem.deltas[m].T, dim=-1).max()) for a in (k, k[: r.info["n_prompt"]]))
                for r in (mem.records[i] for i in ids) for k in [r.key.view(r.info["n_tokens"], -1)])
            assert mem.eps[m] == pytest.approx(want, rel=1e-6)
        r0 = next(iter(mem.records.values()))
        acts = r0.key.view(r0.info["n_tokens"], -1)
        per_tok = torch.linalg.vector_norm(acts @ mem.deltas[0].T, dim=-1)
        assert float(activation_score(acts, mem.deltas[0], pool="max")) == float(per_tok.max())
        assert float(activation_score(acts, mem.deltas[0], pool="max")) > float(activation_score(acts, mem.deltas[0]))
        g = torch.Generator().manual_seed(5)
        a = torch.cat([torch.zeros(1, 3, acts.shape[1]), acts.unsqueeze(0)], dim=1).repeat(3, 1, 1)
        a[1] = torch.randn(a.shape[1:], generator=g)
        real = torch.ones(3, a.shape[1], dtype=torch.long)
        real[0, :3] = 0
        real[2] = 0
        for bounded in (True, False):
            best, ids = mem.ratios(a, real, bounded=bounded)
            ref_best, ref_ids = _reference_ratios(mem, a, real)
            assert torch.equal(ids, ref_ids) and torch.allclose(best, ref_best, rtol=1e-5)
            alone, _ = mem.ratios(acts.unsqueeze(0), None, bounded=bounded)
            assert float(alone[0]) == pytest.approx(float(best[0]), rel=1e-6)
            assert float(best[2]) == 0.0
        before = {i: (r.key.clone(), r.value.clone()) for i, r in mem.records.items()}
        eps_before = dict(mem.eps)
        with pytest.raises(ValueError, match="router_pool"):
            kedit.edit(model, tok, [reqs[3]], method="wise", evaluate=False)  # the default pool is "mean"
        info = dict(r0.info, edit_id="mixed", pool="mean", memory=99)
        with pytest.raises(ValueError, match="router pool"):
            add_entries(model, [MemoryEntryUpdate(f"{mem.module_path}#wise:mixed", r0.key, r0.value, info)])
        mem = _side(model)
        assert set(mem.records) == set(before) and mem.eps == eps_before and mem.pool == "max"
        assert all(torch.equal(mem.records[i].key, k) and torch.equal(mem.records[i].value, v)
                   for i, (k, v) in before.items())
        gens = greedy_answers(model, tok, [q.text for q in picked], max_new_tokens=6)
        assert [answers_match(gen, q.target_new) for gen, q in zip(gens, picked)] == [True, True]
    finally:
        res.revert(model)
    _no_memory(model)
    from kedit.methods.wise import WISEConfig

    with pytest.raises(ValueError, match="router_pool"):
        WISEConfig(router_pool="sum")
