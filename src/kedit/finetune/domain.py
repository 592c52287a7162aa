"""The testbed analogue of forgetting-aware fine-tuning's data: phase 1 = the world's general text (filler and
the facts the testbed models were trained on), phase 2 = a new "domain": new persons, named by the world
generator's syllable pool (never a substring of an existing name), each with one fact per person relation whose
object is an existing entity, written with every template of the relation. Forgetting is measured as recall lost
on the old world's trained facts; phase-2 learning as recall of the new facts."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Domain", "new_domain", "old_world_probes", "phase1_texts"]


@dataclass(frozen=True)
class Domain:
    persons: list[str]
    facts: dict[str, dict[str, str]]  # relation -> person -> object
    sentences: list[str]  # the phase-2 training text
    probes: list[tuple[str, str]]  # (prompt, object) for every (fact, template)


def new_domain(world, n_persons: int = 24, seed: int = 1) -> Domain:
    """``n_persons`` new persons with a fact for every person relation (deterministic in ``world`` and ``seed``)."""
    from kedit.testbed.world import RELATIONS, _NamePool, all_names, fact_sentence

    if n_persons < 1:
        raise ValueError(f"the new domain needs at least one person, got {n_persons}")
    rng = random.Random(f"kedit-finetune-domain/{seed}")
    pool = _NamePool(rng)
    for name in all_names(world):
        pool.words.extend(w.lower() for w in name.replace(".", " ").split())
    persons = [f"{pool.new((2, 2))} {pool.new((2, 3))}" for _ in range(n_persons)]
    facts: dict[str, dict[str, str]] = {}
    sentences, probes = [], []
    for rel in sorted(RELATIONS):
        r = RELATIONS[rel]
        if r.subject_type != "person":
            continue
        objects = world.entities[r.object_type]
        facts[rel] = {p: rng.choice(objects) for p in persons}
        for p in persons:
            for t in r.templates:
                sentences.append(fact_sentence(t, p, facts[rel][p]))
                probes.append((t.format(p), facts[rel][p]))
    rng.shuffle(sentences)
    return Domain(persons, facts, sentences, probes)


def phase1_texts(world, n: int) -> list[str]:
    """The first ``n`` sentences of the world's (shuffled) training text: filler, facts and two-hop lines."""
    from kedit.testbed import corpus

    if n < 1:
        raise ValueError(f"phase 1 needs at least one text, got {n}")
    return corpus(world, n)


def old_world_probes(world, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """A seeded sample of ``n`` trained (prompt, object) pairs of the old world (all of them if ``n`` is larger)."""
    from kedit.testbed.world import trained_pairs

    pairs = [(t.format(s), o) for _, s, t, o in trained_pairs(world)]
    random.Random(seed).shuffle(pairs)
    return pairs[:n]
