"""The KG controller (OneEdit's resolution rules, its files, the testbed world) and the rule interpreter."""

from __future__ import annotations

from pathlib import Path

import pytest

from kedit.service.interpreter import RuleInterpreter
from kedit.service.kg import (
    KGController,
    KGError,
    MemoryStore,
    Relation,
    UnknownRelationError,
    default_templates,
    load_oneedit,
    parse_library,
    triple_requests,
)
from kedit.service.kg import testbed_library as world_library
from kedit.service.kg import testbed_triples as world_triples

ONEEDIT = Path(__file__).resolve().parents[1] / "data" / "oneedit"  # copies of OneEdit's files
LIB = [Relation("spouse", "one2one", "spouse"), Relation("father", "one2one"), Relation("child", "one2many"),
       Relation("paternal grandfather", "one2one", "", ("father", "father")),
       Relation("husband", "one2one", "wife"), Relation("wife", "one2one", "husband")]


@pytest.fixture(scope="module")
def db_url():  # no database here
    return None


def test_one2one_conflict_replaces_the_old_tail_and_its_reverse():
    kg = KGController(MemoryStore([("A", "spouse", "B"), ("B", "spouse", "A")]), LIB)
    res = kg.resolve(("A", "spouse", "C"))
    assert set(res.rollback) == {("A", "spouse", "B"), ("B", "spouse", "A")}
    assert {("A", "spouse", "C"), ("C", "spouse", "A")} <= set(res.edit)
    kg.apply(res)
    assert set(kg.store) == {("A", "spouse", "C"), ("C", "spouse", "A")}
    kg.undo(res)
    assert set(kg.store) == {("A", "spouse", "B"), ("B", "spouse", "A")}


def test_one2many_never_rolls_back_and_restating_a_fact_changes_nothing():
    kg = KGController(MemoryStore([("A", "child", "B"), ("A", "spouse", "S")]), LIB)
    assert kg.resolve(("A", "child", "C")).rollback == []
    assert kg.resolve(("A", "spouse", "S")).rollback == []


def test_multihop_composition_both_directions():
    kg = KGController(MemoryStore([("B", "father", "C"), ("Z", "father", "A")]), LIB)
    res = kg.resolve(("A", "father", "B"))
    assert ("A", "paternal grandfather", "C") in res.edit  # new triple is the first hop
    assert ("Z", "paternal grandfather", "B") in res.edit  # ... and the second
    kg2 = KGController(MemoryStore([("B", "father", "C"), ("A", "paternal grandfather", "X")]), LIB)
    res2 = kg2.resolve(("A", "father", "B"))
    assert ("A", "paternal grandfather", "X") in res2.rollback  # the composed one2one replaces too


def test_reverse_expansion_and_unknown_relation():
    kg = KGController(MemoryStore(), LIB)
    assert kg.resolve(("A", "husband", "B")).edit == [("A", "husband", "B"), ("B", "wife", "A")]
    with pytest.raises(UnknownRelationError, match="unknown relation 'nope'"):
        kg.resolve(("A", "nope", "B"))
    with pytest.raises(KGError, match="three non-empty"):
        kg.resolve(("A", "", "B"))


def test_triple_requests_use_oneedit_templates():
    assert default_templates("first_lady") == ("The first lady of {} is", "{}'s first lady is")
    reqs = triple_requests(("Barack_Obama", "spouse", "Michelle_Obama"), Relation("spouse"))
    assert reqs == [{"prompt": "The spouse of {} is", "subject": "Barack Obama", "target_new": "Michelle Obama"},
                    {"prompt": "{}'s spouse is", "subject": "Barack Obama", "target_new": "Michelle Obama"}]


def test_oneedit_files_import():
    triples, rels = load_oneedit((ONEEDIT / "kg.csv").read_text(), (ONEEDIT / "relationship_library.json").read_text())
    lib = {r.name: r for r in rels}
    assert ("Barack_Obama", "born_in", "Honolulu") in triples and len(triples) > 100
    assert lib["paternal grandfather"].multihop == ("father", "father")
    assert lib["husband"].reverse == "wife" and lib["spouse"].type == "one2one"
    assert {r for _, r, _ in triples} <= set(lib)


def test_library_and_csv_errors_are_clear():
    with pytest.raises(KGError, match="not JSON"):
        parse_library("{")
    with pytest.raises(KGError, match="type must be"):
        parse_library('[{"name": "x", "type": "many"}]')
    with pytest.raises(KGError, match="header"):
        load_oneedit("a,b,c\n", "[]")
    with pytest.raises(KGError, match="line 2"):
        load_oneedit("head,relation,tail\nA,B\n", "[]")


def test_testbed_world_is_a_kg_and_its_two_hops_compose():
    triples = world_triples()
    lib = {r.name: r for r in world_library()}
    assert len(triples) > 1000 and lib["born_in"].type == "one2one" and lib["born_country"].multihop
    kg = KGController(MemoryStore(triples), lib.values())
    h, _, t = next(x for x in triples if x[1] == "born_in")
    city = next(x[0] for x in triples if x[1] == "located_in" and x[0] != t)
    country = next(x[2] for x in triples if x[0] == city and x[1] == "located_in")
    res = kg.resolve((h, "born_in", city))
    assert (h, "born_in", t) in res.rollback and (h, "born_country", country) in res.edit


def test_rule_interpreter():
    it = RuleInterpreter(world_library() + [Relation("spouse", "one2one", "spouse")],
                         normalise=lambda s: s.replace(" ", "_") if s == "Barack Obama" else s)
    cases = {
        "Babra Gaiskim was born in Baica.": ("edit", ("Babra Gaiskim", "born_in", "Baica")),
        "The birthplace of Babra Gaiskim is  Baica": ("edit", ("Babra Gaiskim", "born_in", "Baica")),
        "Babra Gaiskim works for Kisi Labs.": ("edit", ("Babra Gaiskim", "works_for", "Kisi Labs")),
        "The spouse of Barack Obama is Michelle": ("edit", ("Barack_Obama", "spouse", "Michelle")),
        "<edit> (Barack Obama, spouse, Michelle)": ("edit", ("Barack_Obama", "spouse", "Michelle")),
        "Where was Babra Gaiskim born?": ("query", None),
        "Babra Gaiskim was born in": ("query", None),
    }
    for text, (op, triple) in cases.items():
        intent = it.interpret(text)
        assert (intent.op, intent.triple) == (op, triple), text
    assert it.interpret("Roll back entry #12").entry_id == 12
    assert it.interpret("undo 3").op == "rollback"
    with pytest.raises(ValueError, match="empty"):
        it.interpret("  ")


# -- rollback: the KG after rolling back any entry == base + the surviving entries replayed in commit order --------
class _Ledger:
    """Entries applied one after the other to a store, as the service's writer does (stated triples, resolution)."""

    def __init__(self, base, lib):
        self.base, self.lib = list(base), lib
        self.kg = KGController(MemoryStore(self.base), lib)
        self.entries: list[tuple[list, object]] = []

    def edit(self, *triples):
        self.entries.append((list(triples), self.kg.apply(self.kg.resolve_all(triples))))

    def roll_back(self, i: int) -> None:
        redone = self.kg.roll_back(self.entries[i:])
        self.entries = self.entries[:i] + [(t, r) for (t, _), r in zip(self.entries[i + 1:], redone)]

    def replay(self) -> set:
        kg = KGController(MemoryStore(self.base), self.lib)
        for triples, _ in self.entries:
            kg.apply(kg.resolve_all(triples))
        return set(kg.store)


def test_rollback_of_a_superseded_one2one_edit_replays_the_later_one():
    led = _Ledger([("A", "spouse", "O"), ("O", "spouse", "A")], LIB)
    led.edit(("A", "spouse", "X"))  # replaces O
    led.edit(("A", "spouse", "Y"))  # replaces X
    led.roll_back(0)
    # undoing entry 1's lists alone would put (A, spouse, O) and its reverse back beside Y
    assert set(led.kg.store) == {("A", "spouse", "Y"), ("Y", "spouse", "A")} == led.replay()
    assert led.entries[0][1].removed == [("A", "spouse", "O"), ("O", "spouse", "A")]  # re-resolved on the base
    led.roll_back(0)
    assert set(led.kg.store) == {("A", "spouse", "O"), ("O", "spouse", "A")}


def test_rollback_of_a_middle_one2many_and_multihop_entry_equals_the_replay():
    led = _Ledger([("A", "child", "B"), ("C", "father", "D")], LIB)
    led.edit(("A", "child", "E"))
    led.edit(("B", "father", "C"))  # composes (B, paternal grandfather, D)
    led.edit(("A", "child", "F"), ("B", "father", "G"))  # replaces C and the composed grandfather
    led.roll_back(1)
    assert set(led.kg.store) == led.replay()
    assert {("A", "child", "B"), ("A", "child", "E"), ("A", "child", "F"), ("B", "father", "G")} <= set(led.kg.store)
    assert ("B", "father", "C") not in led.kg.store and ("B", "paternal grandfather", "D") not in led.kg.store


def test_newest_rollback_restores_exactly_even_what_the_edit_restated():
    lib = [Relation("likes", "one2many", "liked_by"), Relation("liked_by", "one2many", "likes")] + LIB
    base = [("B", "liked_by", "A"), ("A", "spouse", "O"), ("O", "spouse", "A")]
    led = _Ledger(base, lib)
    led.edit(("A", "spouse", "X"))
    before = set(led.kg.store)
    led.edit(("A", "likes", "B"), ("A", "spouse", "O"))  # the reverse (B, liked_by, A) was there already
    assert led.entries[-1][1].added == [("A", "likes", "B"), ("A", "spouse", "O"), ("O", "spouse", "A")]
    led.roll_back(1)
    assert set(led.kg.store) == before  # (B, liked_by, A) stays: the edit did not add it
    led.roll_back(0)
    assert set(led.kg.store) == set(base)


def test_any_rollback_order_equals_the_replay_of_the_survivors():
    import random

    people = ["A", "B", "C", "D", "E"]
    rels = ["spouse", "father", "child", "husband"]
    base = [("A", "spouse", "B"), ("B", "spouse", "A"), ("C", "father", "D"), ("E", "husband", "A"),
            ("A", "wife", "E"), ("A", "child", "C")]
    for seed in range(20):
        rng = random.Random(seed)
        led = _Ledger(base, LIB)
        for _ in range(30):
            if led.entries and rng.random() < 0.35:
                led.roll_back(rng.randrange(len(led.entries)))
                assert set(led.kg.store) == led.replay(), seed
            else:
                h, t = rng.sample(people, 2)
                led.edit((h, rng.choice(rels), t))
        while led.entries:
            led.roll_back(rng.randrange(len(led.entries)))
            assert set(led.kg.store) == led.replay(), seed
        assert set(led.kg.store) == set(base), seed
