"""Counterfactual edit requests over the testbed world."""

from __future__ import annotations

import random
from typing import Any

from ..requests import EditRequest, Probe
from .world import RELATIONS, TWO_HOP, TWO_HOP_BY_FIRST, World

__all__ = ["N_NEIGHBORS", "edit_requests"]

N_NEIGHBORS = 5


def _neighbors(world: World, rng: random.Random, rel: str, subject: str, true_obj: str) -> list[Probe]:
    """Other subjects with the same relation, preferring those that share the true object (CounterFact style),
    each asked with one of ITS trained templates; the answer is their true object."""
    facts = world.facts[rel]
    same = sorted(s for s, o in facts.items() if s != subject and o == true_obj)
    other = sorted(s for s, o in facts.items() if s != subject and o != true_obj)
    rng.shuffle(same)
    rng.shuffle(other)
    chosen = (same + other)[:N_NEIGHBORS]
    tpls = RELATIONS[rel].templates
    out = []
    for s in chosen:
        i = rng.choice(world.train_templates[rel][s])
        out.append(Probe(tpls[i].format(s), facts[s], "neighborhood"))
    return out


def _one_request(world: World, rng: random.Random, rel: str, subject: str, case_id: int) -> EditRequest:
    relation = RELATIONS[rel]
    true_obj = world.facts[rel][subject]
    candidates = [o for o in world.entities[relation.object_type] if o != true_obj]
    if relation.object_type == relation.subject_type:
        candidates = [o for o in candidates if o != subject]
    target_new = rng.choice(sorted(candidates))
    trained = world.train_templates[rel][subject]
    ti = rng.choice(trained)
    heldout = world.heldout_templates(rel, subject)
    others = [i for i in range(len(relation.templates)) if i != ti]
    paraphrases = [relation.templates[i].format(subject) for i in others]

    portability: list[Probe] = []
    two = TWO_HOP_BY_FIRST.get(rel)
    if two is not None:
        th = TWO_HOP[two]
        answer = world.facts[th.second][target_new]
        portability = [Probe(t.format(subject), answer, "two_hop") for t in th.templates]

    spec = []  # same subject, other relations: must not change
    for other_rel in sorted(world.facts):
        if other_rel == rel or subject not in world.facts[other_rel]:
            continue
        j = world.train_templates[other_rel][subject][0]
        spec.append(
            {
                "prompt": RELATIONS[other_rel].templates[j].format(subject),
                "answer": world.facts[other_rel][subject],
                "kind": "relation_specificity",
            }
        )
    attribute = sorted(s for s, o in world.facts[rel].items() if o == target_new and s != subject)[
        :N_NEIGHBORS
    ]
    extra: dict[str, Any] = {
        "relation": rel,
        "template_index": ti,
        "heldout_paraphrases": [relation.templates[i].format(subject) for i in heldout],
        "relation_specificity": spec,
        "attribute_prompts": [
            relation.templates[world.train_templates[rel][s][0]].format(s) for s in attribute
        ],
        "two_hop_trained": subject in set(world.two_hop_train),
        "source": "kedit-testbed",
    }
    return EditRequest(
        prompt=relation.templates[ti],
        subject=subject,
        target_new=target_new,
        target_true=true_obj,
        paraphrases=tuple(paraphrases),
        neighborhood=tuple(_neighbors(world, rng, rel, subject, true_obj)),
        portability=tuple(portability),
        aliases=tuple(world.aliases.get(subject, ())),
        case_id=str(case_id),
        extra=extra,
    )


def edit_requests(
    world: World, n: int | None = None, seed: int = 0, *, relations: list[str] | None = None
) -> list[EditRequest]:
    """Counterfactual edit requests, deterministic for ``(world, n, seed, relations)``.

    Facts are drawn round-robin over the (sorted) relations, each relation's subjects in a seeded random order,
    so that a small ``n`` covers every relation. ``n=None`` returns one request per fact. Every request uses a
    *trained* template as its prompt; its paraphrases are all the other templates of the relation (held-out ones
    included, also listed in ``extra["heldout_paraphrases"]``); neighbourhood probes are other subjects with the
    same relation and their true objects; portability probes (``kind="two_hop"``) ask the two-hop question whose
    answer follows from the NEW object; ``aliases`` are the subject's aliases.
    """
    rng = random.Random(seed)
    rels = sorted(relations if relations is not None else world.facts)
    for r in rels:
        if r not in RELATIONS:
            raise KeyError(f"unknown relation {r!r}; known: {sorted(RELATIONS)}")
    queues = {}
    for r in rels:
        subs = sorted(world.facts[r])
        rng.shuffle(subs)
        queues[r] = subs
    order: list[tuple[str, str]] = []
    depth = 0
    while any(depth < len(q) for q in queues.values()):
        for r in rels:
            if depth < len(queues[r]):
                order.append((r, queues[r][depth]))
        depth += 1
    if n is not None:
        order = order[:n]
    return [_one_request(world, rng, r, s, i) for i, (r, s) in enumerate(order)]
