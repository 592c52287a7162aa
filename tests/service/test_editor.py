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


def _born_in_edits(n: int):
    """The first ``n`` born_in facts of the testbed world, each edited to another city (one request each)."""
    from kedit.testbed import load_world

    world = load_world()
    cities = world.entities[world.relations["born_in"].object_type]
    facts = [f for f in world.iter_facts() if f.relation == "born_in"][:n]
    return [[{"prompt": "{} was born in", "subject": f.subject,
              "target_new": [c for c in cities if c != f.object][i % 5]}] for i, f in enumerate(facts)]


def test_memory_rollback_of_a_splitting_entry_leaves_what_a_restart_replays(base_model):
    # persons 4 & 8 and 8 & 12 have GRACE keys 1.93 / 1.95 apart (< 2 eps0): entry 8 splits the balls of 4 and 12.
    # Removing entry 8's records in place keeps the shrunk radii (the codebook's caps), a replay of the survivors
    # has radii eps0: the served model would differ from what a restart serves (the storm's mismatch)
    from kedit.memory import get_memory

    ed = _editor(base_model, "grace", {})
    deltas = {}
    for i, reqs in enumerate(_born_in_edits(12), start=1):
        deltas[i] = ed.compute(reqs)
        ed.apply(i, deltas[i])
    (book,) = get_memory(ed.model).values()
    assert min(e.radius for e in book.entries) < 0.99  # the split happened
    ed.remove(8)
    replay = _editor(base_model, "grace", {})
    for i in [i for i in deltas if i != 8]:
        replay.apply(i, deltas[i].copy())
    assert state_fingerprint(ed.model) == state_fingerprint(replay.model)
    assert state_fingerprint(ed.replica) == state_fingerprint(ed.model)


def test_readers_never_see_a_rollback_half_done(base_model):
    # a rollback of a memory entry empties the memory and refills it; a reader (an ask, GET /v1/state) must see
    # the state before or after it, never one in between
    import threading

    ed = _editor(base_model, "grace", {})
    for i, reqs in enumerate(_born_in_edits(12), start=1):
        ed.apply(i, ed.compute(reqs))
    def state():
        fp, applied = ed.state()
        return fp, tuple(applied)

    expected = {state()}
    seen: set = set()
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            seen.add(state())

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in (2, 5, 8, 11, 3):
            ed.remove(i)
            expected.add(state())
    finally:
        stop.set()
        t.join()
    assert seen and seen <= expected, f"{len(seen - expected)} intermediate states seen"


@pytest.mark.parametrize("method,config", [("ft-m", {"epochs": 3}), ("grace", {})])
def test_restore_after_a_middle_removal_is_bitwise(base_model, method, config):
    # what a rollback whose ledger commit failed does: the model goes back to the state before the removal
    ed = _editor(base_model, method, config)
    _run(ed, [R1, R2, R3])
    before, replica_before, snap = state_fingerprint(ed.model), state_fingerprint(ed.replica), ed.snapshot()
    ed.remove(2)  # a weight method recomputes entry 3 here
    assert state_fingerprint(ed.model) != before
    ed.restore(snap)
    assert list(ed.applied) == [1, 2, 3]
    assert state_fingerprint(ed.model) == before and state_fingerprint(ed.replica) == replica_before
    ed.remove(3)  # and the restored entries roll back as before
    ed.remove(2)
    ed.remove(1)
    assert state_fingerprint(ed.model) == state_fingerprint(base_model[0])
