"""Testbed unlearning splits (sizes, nesting, determinism, disjointness, perturbed answers of the right type), the
retain model's training data, and the TOFU / KnowUnDo loaders with their bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kedit.testbed import load_world
from kedit.unlearn.loaders import load_forget_spec, load_knowundo, load_tofu
from kedit.unlearn.retain_model import retain_training_facts
from kedit.unlearn.splits import PERSON_RELATIONS, QAItem, UnlearnSplit, forget_persons, mentions
from kedit.unlearn.splits import testbed_split as make_split

DATA = Path(__file__).resolve().parents[1] / "data" / "unlearn"


@pytest.fixture(scope="module")
def world():
    return load_world()


def test_split_sizes_nesting_and_determinism(world):
    sizes = {s: forget_persons(world, s) for s in ("forget01", "forget05", "forget10")}
    assert [len(v) for v in sizes.values()] == [2, 12, 24]
    assert set(sizes["forget01"]) < set(sizes["forget05"]) < set(sizes["forget10"])
    assert forget_persons(world, "forget10") == sizes["forget10"]
    assert forget_persons(world, "forget10", seed=1) != sizes["forget10"]
    with pytest.raises(ValueError, match="unknown forget split"):
        forget_persons(world, "forget50")


def test_forget10_is_every_fact_of_its_persons_and_disjoint_from_retain(world):
    sp = make_split("forget10", world)
    persons = set(sp.forget_subjects)
    assert len(sp.forget) == len(persons) * len(PERSON_RELATIONS)
    assert {(q.subject, q.relation) for q in sp.forget} == {(p, r) for p in persons for r in PERSON_RELATIONS}
    assert not persons & {q.subject for q in sp.retain}
    assert len(sp.retain) == (len(world.entities["person"]) - len(persons)) * len(PERSON_RELATIONS)
    # no untouched set names a forgotten person, not even as an object (founded_by of a forgotten founder)
    for items in (sp.retain, *sp.extra.values()):
        assert not any(q.answer in persons or q.subject in persons for q in items)
    assert sp.info["left_out_founded_by"] == sum(1 for c, f in world.facts["founded_by"].items() if f in persons)
    for q in sp.forget[:30]:
        otype = world.relations[q.relation].object_type
        assert q.answer == world.facts[q.relation][q.subject]
        assert len(q.perturbed_answers) == 5 and q.answer not in q.perturbed_answers
        assert all(x in world.entities[otype] for x in q.perturbed_answers)
        assert q.paraphrased_question != q.question and q.subject in q.paraphrased_question
    holdout_names = {q.subject for q in sp.holdout}
    assert len(holdout_names) == len(persons) and not holdout_names & set(world.entities["person"])


def test_split_check_reports_overlap_and_empty():
    a = QAItem("Q: x? A:", "y")
    with pytest.raises(ValueError, match="1 of 2 forget items are also in the retain set"):
        UnlearnSplit("s", [a, QAItem("q2", "z")], [a]).check()
    with pytest.raises(ValueError, match="empty forget set"):
        UnlearnSplit("s", [], [a]).check()


def test_retain_training_data_never_names_a_forgotten_person(world):
    persons = forget_persons(world, "forget10")
    kept, dropped = retain_training_facts(world, persons)
    names = mentions(world, persons)
    assert dropped > 24 * 6 and kept
    assert not any(n in p or n in o for p, o in kept for n in names)
    kept01, _ = retain_training_facts(world, forget_persons(world, "forget01"))
    assert len(kept01) > len(kept)


def test_tofu_and_knowundo_loaders():
    forget = load_tofu(DATA / "tofu_forget10_head3.jsonl")
    assert len(forget) == 3 and len(forget[0].perturbed_answers) == 5 and forget[0].paraphrased_answer
    world_facts = load_tofu(DATA / "tofu_world_facts_head3.json")  # multiple choice: options -> perturbed
    assert world_facts[0].answer == "Paris" and set(world_facts[0].perturbed_answers) == {"Berlin", "London", "Madrid"}
    ku = load_knowundo(DATA / "knowundo_privacy_unlearn_val_head3.json")
    assert len(ku) == 3 and ku[0].question.startswith("What is the significance")
    sp = load_forget_spec(str(DATA / "tofu_forget10_head3.jsonl"), retain=str(DATA / "tofu_retain90_head2.jsonl"))
    assert len(sp.forget) == 3 and len(sp.retain) == 2 and sp.info["format"] == "tofu"
    sp = load_forget_spec(str(DATA / "knowundo_privacy_unlearn_val_head3.json"),
                          retain=str(DATA / "knowundo_privacy_retention_val_head3.json"))
    assert sp.info["format"] == "knowundo" and len(sp.retain) == 3


def test_bad_specs_and_records(tmp_path):
    with pytest.raises(ValueError, match="unknown testbed forget split"):
        load_forget_spec("testbed:forget99")
    with pytest.raises(ValueError, match="no such file"):
        load_forget_spec(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="needs 'question' and 'answer'"):
        load_tofu(bad)
    same = DATA / "tofu_forget10_head3.jsonl"
    with pytest.raises(ValueError, match="3 of 3 forget items are also in the retain set"):
        load_forget_spec(str(same), retain=str(same))
    empty = tmp_path / "empty.json"
    empty.write_text("[]", encoding="utf-8")
    with pytest.raises(ValueError, match="no records"):
        load_knowundo(empty)


def test_committed_retain_model_matches_its_split(world):
    import torch

    from kedit.testbed import load_testbed_model
    from kedit.unlearn.retain_model import load_retain_model, retain_model_dir

    d = retain_model_dir("forget10", "gpt2")
    assert d is not None and d.parent.parent.name == "assets"  # committed, not built on the fly
    record = json.loads((d / "retain.json").read_text(encoding="utf-8"))
    assert record["forget_persons"] == forget_persons(world, "forget10")
    assert record["training_pairs"] == len(retain_training_facts(world, record["forget_persons"])[0])
    model, tok = load_retain_model("forget10", "gpt2")
    assert next(model.parameters()).dtype == torch.float32
    _, base_tok = load_testbed_model("gpt2")
    assert tok.get_vocab() == base_tok.get_vocab()
    with pytest.raises(FileNotFoundError, match="kedit unlearn-retain --split forget05"):
        load_retain_model("forget05", "llama")
