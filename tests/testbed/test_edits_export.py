from __future__ import annotations

import json
from pathlib import Path

import pytest

from kedit.requests import EditRequest
from kedit.testbed import edit_requests, generate_world
from kedit.testbed.export import export_all, to_counterfact, to_knowedit, to_zsre
from kedit.testbed.world import RELATIONS, TWO_HOP, TWO_HOP_BY_FIRST

SHARED = Path("/work/shared/data")

COUNTERFACT_KEYS = {
    "case_id", "pararel_idx", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts",
    "attribute_prompts", "generation_prompts",
}  # fmt: skip
REWRITE_KEYS = {"prompt", "relation_id", "subject", "target_new", "target_true"}
ZSRE_KEYS = {"subject", "src", "pred", "rephrase", "alt", "answers", "loc", "loc_ans", "cond"}
KNOWEDIT_KEYS = {
    "subject", "target_new", "prompt", "ground_truth", "rephrase_prompt", "cond", "locality", "portability"
}  # fmt: skip


@pytest.fixture(scope="module")
def world():
    return generate_world(0)


@pytest.fixture(scope="module")
def requests(world):
    return edit_requests(world, n=120, seed=0)


def test_requests_are_valid(world, requests):
    assert len(requests) == 120
    assert {r.extra["relation"] for r in requests} == set(RELATIONS)
    for r in requests:
        assert isinstance(r, EditRequest)
        rel = RELATIONS[r.extra["relation"]]
        assert r.target_true == world.facts[rel.name][r.subject]
        assert r.target_new != r.target_true
        assert r.target_new in world.entities[rel.object_type]
        assert r.prompt in [rel.templates[i] for i in world.train_templates[rel.name][r.subject]]
        assert r.text not in r.paraphrases
        assert set(r.extra["heldout_paraphrases"]) <= set(r.paraphrases)
        assert r.extra["heldout_paraphrases"]
        for p in r.neighborhood:
            assert r.subject not in p.prompt
            subj = next(s for s in world.facts[rel.name] if s in p.prompt)
            assert p.answer == world.facts[rel.name][subj]
        two = TWO_HOP_BY_FIRST.get(rel.name)
        if two:
            assert r.portability and all(p.kind == "two_hop" for p in r.portability)
            assert all(p.answer == world.facts[TWO_HOP[two].second][r.target_new] for p in r.portability)
        assert tuple(world.aliases.get(r.subject, ())) == r.aliases
        EditRequest.from_dict(r.to_dict())  # serialisable round trip
        json.dumps(r.to_dict())


def test_requests_deterministic(world, requests):
    again = edit_requests(world, n=120, seed=0)
    assert [r.to_dict() for r in again] == [r.to_dict() for r in requests]
    other = edit_requests(world, n=120, seed=1)
    assert [r.to_dict() for r in other] != [r.to_dict() for r in requests]


def test_all_requests_and_aliases(world):
    reqs = edit_requests(world)
    assert len(reqs) == sum(len(v) for v in world.facts.values())
    assert any(r.aliases for r in reqs)


def _sample_keys(path: Path) -> list[set]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return [set(r) for r in data]


def test_counterfact_shape(requests):
    recs = to_counterfact(requests)
    for rec in recs:
        assert set(rec) == COUNTERFACT_KEYS
        rr = rec["requested_rewrite"]
        assert set(rr) == REWRITE_KEYS
        assert set(rr["target_new"]) == {"str", "id"} and set(rr["target_true"]) == {"str", "id"}
        assert rr["prompt"].count("{}") == 1
    sample = SHARED / "counterfact/DERIVED_rome_fields_only/counterfact_rome_fields_sample.json"
    if sample.is_file():
        real = json.loads(sample.read_text(encoding="utf-8"))
        assert set(real[0]) == COUNTERFACT_KEYS
        assert set(real[0]["requested_rewrite"]) == REWRITE_KEYS


def test_zsre_shape(requests):
    for rec in to_zsre(requests):
        assert set(rec) == ZSRE_KEYS
        assert isinstance(rec["answers"], list)
    sample = SHARED / "zsre/zsre_mend_train-1k_sample.json"
    if sample.is_file():
        assert all(k == ZSRE_KEYS for k in _sample_keys(sample))


def test_knowedit_shape(requests):
    for rec in to_knowedit(requests):
        assert set(rec) == KNOWEDIT_KEYS
        assert set(rec["locality"]) <= {"Relation_Specificity", "Forgetfulness"}
        assert set(rec["portability"]) <= {"Reasoning", "Subject_Aliasing", "Logical_Generalization"}
        for items in list(rec["locality"].values()) + list(rec["portability"].values()):
            for item in items:
                assert set(item) == {"prompt", "ground_truth"}
    sample = SHARED / "knowedit/ZsRE/ZsRE-test-all_sample.json"
    if sample.is_file():
        assert all(k == KNOWEDIT_KEYS for k in _sample_keys(sample))


def test_export_all(requests, tmp_path):
    paths = export_all(requests[:10], tmp_path)
    for p in paths.values():
        assert len(json.loads(p.read_text(encoding="utf-8"))) == 10
