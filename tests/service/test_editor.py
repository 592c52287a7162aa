"""The editor's rollback semantics on real edits: a memory method removes any entry by id; a weight method reverts
the newest bitwise and removes a middle one by recomputing the later edits (the result equals editing without it
from the start)."""

from __future__ import annotations

import copy

import pytest

from kedit.service.editor import Editor, EditorError, state_fingerprint

R1 = [{"prompt": "{} was born in", "subject": "Babra Gaiskim", "target_new": "Baica"}]
R2 = [{"prompt": "{} works as a", "subject": "Babra Gaiskim", "target_new": "pilot"}]
R3 = [{"prompt": "{} plays the", "subject": "Babra Gaiskim", "target_new": "drums"}]


def _editor(base_model, method, config):
    model, tok = base_model
    return Editor(copy.deepcopy(model), tok, method=method, config=config)


def _run(ed, batches):
    for i, reqs in enumerate(batches, start=1):
        ed.apply(i, ed.compute(reqs))


@pytest.fixture(scope="module")
def db_url():  # the editor needs no database
    return None


def test_weight_method_newest_bitwise_and_middle_by_recompute(base_model):
    cfg = {"epochs": 3}
    ed = _editor(base_model, "ft-m", cfg)
    base = state_fingerprint(ed.model)
    _run(ed, [R1, R2])
    after_two = state_fingerprint(ed.model)
    ed.apply(3, ed.compute(R3))
    assert ed.remove(3) == {}
    assert state_fingerprint(ed.model) == after_two  # newest: bitwise
    ed.apply(3, ed.compute(R3))
    recomputed = ed.remove(2)
    assert list(recomputed) == [3] and list(ed.applied) == [1, 3]
    ref = _editor(base_model, "ft-m", cfg)
    _run(ref, [R1, R3])
    assert state_fingerprint(ed.model) == state_fingerprint(ref.model)  # as if entry 2 had never been
    assert state_fingerprint(ed.replica) == state_fingerprint(ed.model)
    ed.remove(1)
    ed.remove(3)
    assert state_fingerprint(ed.model) == base


def test_memory_method_removes_a_middle_entry_by_id(base_model):
    ed = _editor(base_model, "grace", {})
    base = state_fingerprint(ed.model)
    _run(ed, [R1, R2, R3])
    answer3 = ed.ask("Babra Gaiskim plays the")
    assert ed.remove(2) == {}
    assert list(ed.applied) == [1, 3]
    assert ed.ask("Babra Gaiskim plays the") == answer3
    assert ed.ask("Babra Gaiskim was born in").strip().startswith("Baica")
    with pytest.raises(EditorError, match="not applied"):
        ed.remove(2)
    ed.remove(1)
    ed.remove(3)
    assert state_fingerprint(ed.model) == base


def test_editor_refuses_a_model_with_edits(base_model):
    ed = _editor(base_model, "grace", {})
    ed.apply(1, ed.compute(R1))
    with pytest.raises(EditorError, match="without edits"):
        Editor(ed.model, ed.tok)


def test_memory_rollback_leaves_what_a_restart_replays(base_model):
    # entries 2 and 3 edit the same prompt as entry 1: the codebook expands/splits around entry 1's key, so
    # removing it in place would leave a memory no replay of the survivors reproduces
    same = [dict(R1[0], target_new=t) for t in ("Neirvoum", "Tetreian")]
    ed = _editor(base_model, "grace", {})
    deltas = {}
    for i, reqs in enumerate([R1, [same[0]], R2, [same[1]]], start=1):
        deltas[i] = ed.compute(reqs)
        ed.apply(i, deltas[i])
    ed.remove(1)
    ed.remove(3)
    replay = _editor(base_model, "grace", {})
    for i in (2, 4):
        replay.apply(i, deltas[i].copy())
    assert state_fingerprint(ed.model) == state_fingerprint(replay.model)
    assert state_fingerprint(ed.replica) == state_fingerprint(ed.model)
