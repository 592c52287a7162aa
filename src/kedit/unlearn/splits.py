"""Testbed unlearning splits: the TOFU forget01/05/10 analogue on the kedit synthetic world.

TOFU (Maini et al., 2024, arXiv 2401.06121) forgets every fact of 1 %, 5 % or 10 % of its fictitious authors and
keeps the rest. Here the "authors" are the testbed's persons: ``forget10`` is every fact of 10 % of the persons
(chosen by a seeded shuffle; forget01 ⊂ forget05 ⊂ forget10, as in TOFU), ``retain`` is every fact of the other
persons. A fact of a person is one of the person relations (born_in, citizen_of, works_for, profession, speaks,
plays). Company ``founded_by`` facts whose founder is forgotten mention a forgotten person but are not *about*
one; they are in neither set (their count is reported) and the retain model never sees them either.

Each fact becomes a :class:`QAItem`: the question is a trained template of the fact, the paraphrased question a
held-out one (the world leaves at least one template of every fact out of training), and the perturbed answers
are other objects of the same type. TOFU paraphrases the *answer*; a testbed answer is a single entity, so the
truth ratio here compares the true and perturbed answers after the paraphrased question (see
:mod:`kedit.unlearn.metrics`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from kedit.testbed.world import World

__all__ = [
    "FORGET_SPLITS",
    "PERSON_RELATIONS",
    "PRIVATE_RELATIONS",
    "PUBLIC_RELATIONS",
    "SCOPE_SPLITS",
    "QAItem",
    "UnlearnSplit",
    "forget_halves",
    "forget_persons",
    "holdout_persons",
    "mentions",
    "testbed_scope_split",
    "testbed_split",
]

#: split name -> fraction of persons forgotten
FORGET_SPLITS: dict[str, float] = {"forget01": 0.01, "forget05": 0.05, "forget10": 0.10}
PERSON_RELATIONS = ("born_in", "citizen_of", "works_for", "profession", "speaks", "plays")
#: KnowUnDo-privacy analogue (Tian et al., 2024): a person's personal details are the unlearn scope, the facts of
#: their public life the retention scope
PRIVATE_RELATIONS = ("born_in", "citizen_of", "plays")
PUBLIC_RELATIONS = ("works_for", "profession", "speaks")
#: scope split name -> the forget split whose persons it uses
SCOPE_SPLITS: dict[str, str] = {
    "privacy01": "forget01",
    "privacy05": "forget05",
    "privacy10": "forget10",
    # the persons of forget10 that are not in forget05 (12 of 24): a person set disjoint from privacy05's
    "privacy10minus05": "forget10",
}
#: scope split name -> the forget split whose persons it leaves out
_SCOPE_EXCLUDE: dict[str, str] = {"privacy10minus05": "forget05"}
N_PERTURBED = 5
_SPLIT_SALT = 1_000_003


@dataclass(frozen=True)
class QAItem:
    """One fact as a question/answer pair (prompt-completion: ``question + " " + answer``)."""

    question: str
    answer: str
    paraphrased_question: str = ""
    perturbed_answers: tuple[str, ...] = ()
    subject: str = ""
    relation: str = ""
    #: TOFU: a paraphrase of the answer (then the truth ratio is taken after ``question``)
    paraphrased_answer: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "answer": self.answer,
            "paraphrased_question": self.paraphrased_question,
            "paraphrased_answer": self.paraphrased_answer,
            "perturbed_answers": list(self.perturbed_answers),
            "subject": self.subject,
            "relation": self.relation,
        }


@dataclass
class UnlearnSplit:
    """A forget set, the matching retain set and optional utility sets, with where they came from."""

    name: str
    forget: list[QAItem]
    retain: list[QAItem]
    #: other sets on which utility is measured (TOFU: real authors, world facts); testbed: ``entities``, ``world``
    extra: dict[str, list[QAItem]] = field(default_factory=dict)
    #: never-trained items of the forget set's kind (membership-inference negatives; TOFU: holdout)
    holdout: list[QAItem] = field(default_factory=list)
    forget_subjects: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    #: KnowUnDo scopes to measure token accuracy / perplexity on: ``{"unlearn": [...], "retention": [...]}``
    scopes: dict[str, list[QAItem]] = field(default_factory=dict)

    def check(self) -> None:
        """Raise ``ValueError`` on an empty forget set or one that overlaps the retain set (with counts)."""
        if not self.forget:
            raise ValueError(f"unlearning split {self.name!r} has an empty forget set")
        keys = {(q.question, q.answer) for q in self.retain}
        overlap = [q for q in self.forget if (q.question, q.answer) in keys]
        if overlap:
            raise ValueError(
                f"unlearning split {self.name!r}: {len(overlap)} of {len(self.forget)} forget items are also in the "
                f"retain set ({len(self.retain)} items), e.g. {overlap[0].question!r} -> {overlap[0].answer!r}"
            )


def forget_persons(world: World, split: str, seed: int = 0) -> list[str]:
    """The persons of ``split`` (``forget01`` / ``forget05`` / ``forget10``), deterministic for ``seed``.

    One seeded shuffle of the sorted persons; a split takes the first ``max(1, round(frac * n))`` of it, so the
    splits are nested. 240 testbed persons give 2 / 12 / 24.
    """
    if split not in FORGET_SPLITS:
        raise ValueError(f"unknown forget split {split!r}; expected one of {sorted(FORGET_SPLITS)}")
    persons = sorted(world.entities["person"])
    order = list(persons)
    random.Random(seed * _SPLIT_SALT + 14).shuffle(order)
    k = max(1, round(FORGET_SPLITS[split] * len(persons)))
    return sorted(order[:k])


def forget_halves(split: UnlearnSplit, seed: int = 0) -> dict[str, list[int]]:
    """Two disjoint person halves of ``split``'s forget set, as indices into ``split.forget``: ``{"A": [...],
    "B": [...]}``. The sorted forget persons are shuffled by ``seed``; A takes the first ``⌈n/2⌉``. Deterministic,
    and every fact of a person falls in one half (forget10: 12 + 12 persons, 72 + 72 facts). Meant for held-out
    selection: choose settings / stopping epochs on A, report on B."""
    persons = sorted({q.subject for q in split.forget})
    if len(persons) < 2:
        raise ValueError(f"{split.name}: {len(persons)} forget person(s); two halves need at least 2")
    order = list(persons)
    random.Random(seed * _SPLIT_SALT + 2).shuffle(order)
    a = set(order[: (len(order) + 1) // 2])
    return {
        "A": [i for i, q in enumerate(split.forget) if q.subject in a],
        "B": [i for i, q in enumerate(split.forget) if q.subject not in a],
    }


def mentions(world: World, persons: Sequence[str]) -> list[str]:
    """The strings that name ``persons``: the names and their aliases (longest first)."""
    out = set(persons)
    for p in persons:
        out.update(world.aliases.get(p, []))
    return sorted(out, key=lambda s: (-len(s), s))


def _perturbed(world: World, rng: random.Random, relation: str, obj: str) -> tuple[str, ...]:
    otype = world.relations[relation].object_type
    pool = sorted(x for x in world.entities[otype] if x != obj)
    return tuple(rng.sample(pool, min(N_PERTURBED, len(pool))))


def _question_template(relation: str, indices: Sequence[int]) -> int:
    """The template to ask with: a ``Q: … A:`` form if there is one, else one that does not also begin a two-hop
    template ("X was born in" continues as often with "a city in the country of …"), else the first."""
    from kedit.testbed.world import RELATIONS, TWO_HOP

    tpls = RELATIONS[relation].templates
    two_hop = [t for th in TWO_HOP.values() for t in th.templates]
    for i in indices:
        if tpls[i].startswith("Q:"):
            return i
    for i in indices:
        if not any(t.startswith(tpls[i]) for t in two_hop):
            return i
    return indices[0]


def _qa(world: World, rng: random.Random, relation: str, subject: str) -> QAItem:
    rel = world.relations[relation]
    obj = world.facts[relation][subject]
    trained = world.train_templates[relation][subject]
    held = world.heldout_templates(relation, subject)
    q = rel.templates[_question_template(relation, trained)].format(subject)
    pq = rel.templates[_question_template(relation, held)].format(subject) if held else q
    return QAItem(q, obj, pq, _perturbed(world, rng, relation, obj), subject, relation)


_COMPANY_RELATIONS = ("founded_by", "headquartered_in")


def holdout_persons(world: World, n: int, seed: int = 0) -> list[QAItem]:
    """Facts of ``n`` new persons that are not in the world (names from the world's syllables, objects drawn at
    random): never trained on by any testbed model, the membership-inference negatives."""
    from kedit.testbed.world import _NamePool

    rng = random.Random(seed * _SPLIT_SALT + 97)
    pool = _NamePool(rng)
    taken = set(mentions(world, world.entities["person"])) | {x for v in world.entities.values() for x in v}
    out: list[QAItem] = []
    made = 0
    while made < n:
        name = f"{pool.new((2, 2))} {pool.new((2, 3))}"
        if name in taken or any(name in t or t in name for t in taken):
            continue
        taken.add(name)
        made += 1
        for relation in PERSON_RELATIONS:
            rel = world.relations[relation]
            obj = rng.choice(sorted(world.entities[rel.object_type]))
            k = len(rel.templates)
            q_i, p_i = rng.sample(range(k), 2)
            out.append(
                QAItem(
                    rel.templates[q_i].format(name),
                    obj,
                    rel.templates[p_i].format(name),
                    _perturbed(world, rng, relation, obj),
                    name,
                    relation,
                )
            )
    return out


def testbed_split(split: str, world: World | None = None, seed: int = 0) -> UnlearnSplit:
    """The testbed split ``split`` over ``world`` (default: the committed world).

    ``forget``: every person-relation fact of the forgotten persons; ``retain``: those of the other persons;
    ``extra["entities"]``: the company facts (founded_by facts of forgotten founders left out), the analogue of
    TOFU's real-authors set (other entities); ``extra["world"]``: the geography facts (cities, countries), the
    analogue of TOFU's world facts; ``holdout``: facts of as many new, never-trained persons as are forgotten.
    """
    from kedit.testbed import load_world

    w = world if world is not None else load_world()
    persons = forget_persons(w, split, seed)
    gone = set(persons)
    rng = random.Random(seed * _SPLIT_SALT + 41)
    forget, retain, entity_facts, world_facts = [], [], [], []
    skipped = 0
    for relation in sorted(w.facts):
        for subject in sorted(w.facts[relation]):
            if relation in PERSON_RELATIONS:
                (forget if subject in gone else retain).append(_qa(w, rng, relation, subject))
            elif w.facts[relation][subject] in gone:
                skipped += 1
            elif relation in _COMPANY_RELATIONS:
                entity_facts.append(_qa(w, rng, relation, subject))
            else:
                world_facts.append(_qa(w, rng, relation, subject))
    out = UnlearnSplit(
        name=f"testbed:{split}",
        forget=forget,
        retain=retain,
        extra={"entities": entity_facts, "world": world_facts},
        holdout=holdout_persons(w, len(persons), seed),
        forget_subjects=persons,
        info={
            "persons": len(w.entities["person"]),
            "forget_persons": len(persons),
            "forget_facts": len(forget),
            "retain_facts": len(retain),
            "entity_facts": len(entity_facts),
            "world_facts": len(world_facts),
            "left_out_founded_by": skipped,
            "seed": seed,
        },
    )
    out.check()
    return out


def testbed_scope_split(split: str, world: World | None = None, seed: int = 0) -> UnlearnSplit:
    """The KnowUnDo-privacy analogue ``privacy01 / privacy05 / privacy10`` over the persons of ``forget01 / 05 /
    10``: the **unlearn scope** (``forget``) is their private facts (:data:`PRIVATE_RELATIONS`: birthplace,
    citizenship, sport), the **retention scope** (``retain``) their public facts (:data:`PUBLIC_RELATIONS`:
    employer, profession, language) -- knowledge about the same people that must stay, which is what makes
    over-forgetting visible. ``extra`` holds the TOFU split's ``entities`` / ``world`` utility sets. ``scopes``
    names both scopes for :func:`kedit.unlearn.metrics.scope_metrics`.

    ``privacy10minus05``: the persons of ``forget10`` that are not in ``forget05`` (12 persons, 36 + 36 facts), a
    person set disjoint from ``privacy05``'s -- tune on privacy05, report on this one."""
    if split not in SCOPE_SPLITS:
        raise ValueError(f"unknown scope split {split!r}; expected one of {sorted(SCOPE_SPLITS)}")
    base = testbed_split(SCOPE_SPLITS[split], world, seed)
    excluded: set[str] = set()
    if split in _SCOPE_EXCLUDE:
        from kedit.testbed import load_world

        excluded = set(forget_persons(world if world is not None else load_world(), _SCOPE_EXCLUDE[split], seed))
    persons = [p for p in base.forget_subjects if p not in excluded]
    forget = [q for q in base.forget if q.relation in PRIVATE_RELATIONS and q.subject not in excluded]
    retain = [q for q in base.forget if q.relation in PUBLIC_RELATIONS and q.subject not in excluded]
    out = UnlearnSplit(
        name=f"testbed:{split}",
        forget=forget,
        retain=retain,
        extra=base.extra,
        forget_subjects=persons,
        info={
            "forget_persons": len(persons),
            "excluded_persons_of": _SCOPE_EXCLUDE.get(split),
            "unlearn_scope": len(forget),
            "retention_scope": len(retain),
            "private_relations": list(PRIVATE_RELATIONS),
            "public_relations": list(PUBLIC_RELATIONS),
            "seed": seed,
        },
        scopes={"unlearn": forget, "retention": retain},
    )
    out.check()
    return out
