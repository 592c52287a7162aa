from __future__ import annotations

import pytest

from kedit.testbed import GENERATOR_VERSION, generate_world
from kedit.testbed.world import (
    ENTITY_TYPES,
    REGISTER_LABELS,
    RELATIONS,
    TWO_HOP,
    World,
    WorldConfig,
    all_names,
    heldout_pairs,
    register_pairs,
    trained_pairs,
    training_sentences,
    two_hop_pairs,
)


@pytest.fixture(scope="module")
def world() -> World:
    return generate_world(0)


def test_generator_versions_agree():
    from kedit.testbed import build

    assert build.GENERATOR_VERSION == GENERATOR_VERSION


def test_same_seed_same_world(world):
    again = generate_world(0)
    assert again.to_json() == world.to_json()
    assert again.world_hash == world.world_hash


def test_different_seed_different_world(world):
    other = generate_world(1)
    assert other.world_hash != world.world_hash
    assert other.entities["person"] != world.entities["person"]


def test_json_round_trip(world):
    back = World.from_json(world.to_json())
    assert back.to_json() == world.to_json()
    assert back.world_hash == world.world_hash


def test_json_is_stable_and_sorted(world):
    text = world.to_json()
    assert text.endswith("\n")
    import json

    data = json.loads(text)
    assert list(data) == sorted(data)
    assert data["generator_version"] == GENERATOR_VERSION


def test_entity_types_and_object_types(world):
    assert set(world.entities) == set(ENTITY_TYPES)
    for rel, facts in world.facts.items():
        r = RELATIONS[rel]
        assert facts, rel
        for s, o in facts.items():
            assert s in world.entities[r.subject_type], (rel, s)
            assert o in world.entities[r.object_type], (rel, o)


def test_geography_is_consistent(world):
    for country, capital in world.facts["capital"].items():
        assert world.facts["located_in"][capital] == country
        assert world.facts["capital_of"][capital] == country
    assert len(set(world.facts["capital"].values())) == len(world.facts["capital"])  # one-to-one


def test_names_unique_and_never_substrings(world):
    names = list(all_names(world))
    assert len(names) == len(set(names))
    objects = [o for t in ("language",) for o in world.entities[t]]
    pool = names + objects
    for a in pool:
        for b in pool:
            if a != b:
                assert a not in b, (a, b)


def test_templates_have_one_slot_and_enough_forms():
    for rel in RELATIONS.values():
        assert len(rel.templates) >= 6, rel.name
        assert len(set(rel.templates)) == len(rel.templates)
        assert any(t.startswith("Q:") for t in rel.templates), rel.name
        assert any(not t.startswith("Q:") for t in rel.templates), rel.name
        for t in rel.templates:
            assert t.count("{}") == 1 and not t.endswith(" "), t
    for th in TWO_HOP.values():
        for t in th.templates:
            assert t.count("{}") == 1


def test_every_relation_has_heldout_pairs(world):
    ho = heldout_pairs(world)
    tr = trained_pairs(world)
    assert {r for r, *_ in ho} == set(RELATIONS)
    assert not {(s, t) for _, s, t, _ in ho} & {(s, t) for _, s, t, _ in tr}
    for rel in RELATIONS:
        for s in world.facts[rel]:
            assert world.train_templates[rel][s], (rel, s)
            assert world.heldout_templates(rel, s), (rel, s)
    # every template is trained for some subject of its relation
    for rel, r in RELATIONS.items():
        used = {i for v in world.train_templates[rel].values() for i in v}
        assert used == set(range(len(r.templates))), rel


def test_two_hop_split(world):
    trained = two_hop_pairs(world, trained=True)
    held = two_hop_pairs(world, trained=False)
    assert trained and held
    assert not {s for _, s, _, _ in trained} & {s for _, s, _, _ in held}
    text = training_sentences(world)
    joined = "\n".join(text["two_hop"])
    for _, s, t, o in held[:50]:
        assert f"{t.format(s)} {o}." not in joined
    for name, s, _, o in trained + held:
        if name == "born_country":
            assert world.facts["located_in"][world.facts["born_in"][s]] == o
    assert len({s for _, s, _, _ in trained}) == len(world.two_hop_train)


def test_aliases_appear_in_training_text(world):
    assert world.aliases
    text = "\n".join(training_sentences(world)["facts"])
    for person, aliases in world.aliases.items():
        for a in aliases:
            assert f"{person} is also known as {a}." in text
            assert f"{a} " in text


def test_filler_does_not_state_facts(world):
    filler = "\n".join(world.filler)
    for _, s, t, _o in trained_pairs(world)[:200]:
        assert t.format(s) not in filler


def test_micro_config_is_smaller():
    micro = generate_world(0, WorldConfig.micro())
    assert len(micro.entities["person"]) < len(generate_world(0).entities["person"])


def test_register_lines_put_the_object_right_after_each_company_name(world):
    from kedit.testbed.build import training_facts

    pairs = register_pairs(world)
    companies = world.entities["company"]
    assert {s for _, s, _, _ in pairs} == set(companies)
    facts = set(training_facts(world))
    sentences = set(training_sentences(world)["facts"])
    for rel, subject, template, obj in pairs:
        assert template.endswith(": {}") and obj == world.facts[rel][subject]
        prompt = template.format(subject)
        assert prompt.endswith(subject)  # nothing between the name and the object
        assert (prompt, obj) in facts and f"{prompt} {obj}." in sentences
        assert template not in RELATIONS[rel].templates  # training text only, never an edit or gate prompt
    assert len(pairs) == sum(len(labels) * len(world.facts[r]) for r, labels in REGISTER_LABELS.items())
