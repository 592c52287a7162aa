"""Conflict-free request selection (kedit.data.select)."""

from __future__ import annotations

import pytest

from kedit.data import distinct_subjects, subject_conflicts
from kedit.requests import EditRequest


def _req(subject: str, target: str, case: str) -> EditRequest:
    return EditRequest(prompt="{} was born in", subject=subject, target_new=target, case_id=case)


REQS = [
    _req("Varnel Okasti", "Tolmarin", "0"),
    _req("Brenram Cakam", "Doro", "1"),
    _req("varnel  OKASTI", "Krukisa", "2"),  # the same subject, spelled differently
    _req("Lone Zeneko", "Rere", "3"),
    _req("Brenram Cakam", "Serpunve", "4"),
]


def test_distinct_subjects_keeps_first_of_each_in_order():
    kept = distinct_subjects(REQS)
    assert [r.case_id for r in kept] == ["0", "1", "3"]
    assert subject_conflicts(kept) == 0
    assert subject_conflicts(REQS) == 2


def test_distinct_subjects_limit_counts_kept_requests_and_refuses_too_few():
    assert [r.case_id for r in distinct_subjects(REQS, limit=2)] == ["0", "1"]
    with pytest.raises(ValueError, match="only 3 distinct subjects"):
        distinct_subjects(REQS, limit=4)


def test_testbed_spec_with_distinct_subjects():
    import typer

    from kedit.cli import resolve_requests

    plain = resolve_requests("testbed:0-200")
    assert subject_conflicts(plain) > 0  # the testbed lists several relations per subject
    kept = resolve_requests("testbed:0-200", limit=50, distinct=True)
    assert len(kept) == 50 and subject_conflicts(kept) == 0
    assert [r.case_id for r in kept] == [r.case_id for r in distinct_subjects(plain)[:50]]
    with pytest.raises(typer.Exit):
        resolve_requests("testbed:0-10", limit=50, distinct=True)


def test_distinct_per_batch_keeps_every_request_and_chunks_of_k():
    from kedit.data import distinct_per_batch

    reqs = [_req(s, "x", str(i)) for i, s in enumerate("A A A B B C D E".split())]
    out = distinct_per_batch(reqs, 3)
    assert sorted(r.case_id for r in out) == sorted(r.case_id for r in reqs)  # nothing lost
    chunks = [out[i : i + 3] for i in range(0, len(out), 3)]
    assert [[r.subject for r in c] for c in chunks] == [["A", "B", "C"], ["A", "B", "D"], ["A", "E"]]
    assert all(subject_conflicts(c) == 0 for c in chunks)
    # too many requests of one subject: the chunk is filled (length k kept) and the conflict is visible
    crowded = distinct_per_batch([_req(s, "x", str(i)) for i, s in enumerate("A A A B".split())], 2)
    assert [r.subject for r in crowded] == ["A", "B", "A", "A"]
    assert subject_conflicts(crowded[2:4]) == 1
    with pytest.raises(ValueError):
        distinct_per_batch(reqs, 0)


def test_whole_subjects_keeps_all_or_none_of_a_subject_interleaved():
    from kedit.data import whole_subjects

    reqs = [_req(s, "x", str(i)) for i, s in enumerate("A B A C B A D C E".split())]
    out = whole_subjects(reqs, limit=5)
    # A (3), B (2) reach 5: C, D, E stay untouched; round-robin A B A B A
    assert [r.case_id for r in out] == ["0", "1", "2", "4", "5"]
    assert {r.subject for r in out} == {"A", "B"}
    # the limit falls inside a subject: its first requests come in every round, the tail of the last round is cut
    out = whole_subjects(reqs, limit=6)
    assert [r.subject for r in out] == ["A", "B", "C", "A", "B", "C"]
    assert len(whole_subjects(reqs)) == len(reqs)  # no limit: everything, interleaved
    with pytest.raises(ValueError, match="only 9 requests"):
        whole_subjects(reqs, limit=10)


def test_whole_subjects_leaves_a_lifelong_locality_pool_on_the_testbed():
    """T = 1000 on the default world: the stream of whole subjects leaves hundreds of facts untouched (the
    testbed's requests in order touch 315 of 316 subjects and leave 6); the final-report slice stays out."""
    from kedit.cli import resolve_requests
    from kedit.eval.lifelong import choose_probes, make_stream, testbed_locality_facts, testbed_reedit_targets
    from kedit.testbed import load_world

    world = load_world()
    reqs = resolve_requests("testbed:0-1500", limit=1000, whole=True)
    stream = make_stream(reqs, 1000, 0.1, k=1, targets=testbed_reedit_targets(world))
    probes, pool = choose_probes(testbed_locality_facts(world), stream, 200)
    assert len(probes) == 200 and pool >= 500
    assert not any(1500 <= int(str(r.case_id).split("/")[0]) < 1550 for r in stream)
