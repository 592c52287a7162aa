"""A deterministic synthetic knowledge world.

The world is a small typed knowledge graph over novel, syllable-built names (persons, cities, countries,
companies, languages) plus a few real-word object types (professions, instruments). Every relation comes with
several surface templates (declarative and question/answer forms) with exactly one ``"{}"`` for the subject; a
prompt ends right before the object, which follows after one space.

Everything is generated from ``random.Random(seed)`` (never the global RNG), so the same seed and
:class:`WorldConfig` always give the same world, byte for byte in :meth:`World.to_json`.

Splits recorded in the world:

* ``train_templates[relation][subject]``: the template indices a fact is trained with; the remaining indices of
  that relation are the held-out (subject, template) pairs used to measure generalisation;
* ``two_hop_train``: the persons whose two-hop sentences are in the training text (portability is measured on
  the other persons).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ENTITY_TYPES",
    "REGISTER_LABELS",
    "RELATIONS",
    "TWO_HOP",
    "TWO_HOP_BY_FIRST",
    "Fact",
    "Relation",
    "TwoHop",
    "World",
    "WorldConfig",
    "alias_pairs",
    "all_names",
    "fact_sentence",
    "filler_sentences",
    "generate_world",
    "heldout_pairs",
    "register_pairs",
    "trained_pairs",
    "training_sentences",
    "two_hop_pairs",
]

ENTITY_TYPES = ("person", "city", "country", "company", "language", "profession", "instrument")


@dataclass(frozen=True)
class Relation:
    """A typed relation with its surface templates (each with exactly one ``"{}"`` for the subject)."""

    name: str
    subject_type: str
    object_type: str
    templates: tuple[str, ...]


@dataclass(frozen=True)
class TwoHop:
    """A composition ``subject -first-> x -second-> answer`` with its templates."""

    name: str
    first: str
    second: str
    templates: tuple[str, ...]


RELATIONS: dict[str, Relation] = {
    r.name: r
    for r in (
        Relation(
            "born_in",
            "person",
            "city",
            (
                "{} was born in",
                "The birthplace of {} is",
                "Q: Where was {} born? A:",
                "{} came into the world in",
                "The city where {} was born is",
                "{} is a native of the city of",
                "Q: In which city was {} born? A:",
                "The place of birth of {} is",
            ),
        ),
        Relation(
            "citizen_of",
            "person",
            "country",
            (
                "{} is a citizen of",
                "{} holds citizenship of",
                "The nationality of {} is",
                "Q: Which country is {} a citizen of? A:",
                "The passport of {} was issued by",
                "The country of citizenship of {} is",
                "Q: What is the nationality of {}? A:",
            ),
        ),
        Relation(
            "works_for",
            "person",
            "company",
            (
                "{} works for",
                "{} is employed by",
                "The employer of {} is",
                "Q: Which company does {} work for? A:",
                "{} draws a salary from",
                "The company that employs {} is",
                "{} is on the payroll of",
            ),
        ),
        Relation(
            "profession",
            "person",
            "profession",
            (
                "{} works as a",
                "{} is by profession a",
                "The profession of {} is",
                "Q: What is the job of {}? A:",
                "The occupation of {} is",
                "{} earns a living as a",
                "Q: What does {} do for a living? A:",
            ),
        ),
        Relation(
            "speaks",
            "person",
            "language",
            (
                "{} speaks",
                "{} is fluent in",
                "The language spoken by {} is",
                "Q: Which language does {} speak? A:",
                "The mother tongue of {} is",
                "{} converses in",
                "{} writes letters in",
            ),
        ),
        Relation(
            "plays",
            "person",
            "instrument",
            (
                "{} plays the",
                "{} is skilled at playing the",
                "The instrument played by {} is the",
                "Q: Which instrument does {} play? A:",
                "The favourite instrument of {} is the",
                "{} practises the",
                "{} performs on the",
            ),
        ),
        Relation(
            "located_in",
            "city",
            "country",
            (
                "{} is located in",
                "{} is a city in",
                "{} lies in the country of",
                "Q: In which country is {}? A:",
                "The city of {} belongs to",
                "The country that contains {} is",
            ),
        ),
        Relation(
            "capital",
            "country",
            "city",
            (
                "The capital of {} is",
                "The capital city of {} is",
                "Q: What is the capital of {}? A:",
                "The seat of government of {} is",
                "{} is governed from",
                "The largest city of {} is",
            ),
        ),
        Relation(
            "capital_of",
            "city",
            "country",
            (
                "{} is the capital of",
                "{} is the capital city of",
                "Q: Which country has {} as its capital? A:",
                "{} serves as the capital of",
                "The country whose capital is {} is",
                "As a capital, {} governs",
            ),
        ),
        Relation(
            "official_language",
            "country",
            "language",
            (
                "The official language of {} is",
                "In {}, people speak",
                "Q: What language is spoken in {}? A:",
                "The people of {} speak",
                "Schools in {} teach in",
                "The national language of {} is",
            ),
        ),
        Relation(
            "headquartered_in",
            "company",
            "city",
            (
                "{} is headquartered in",
                "The headquarters of {} are in",
                "Q: Where is {} based? A:",
                "{} has its main office in",
                "{} is based in the city of",
                "The head office of {} is located in",
            ),
        ),
        Relation(
            "founded_by",
            "company",
            "person",
            (
                "{} was founded by",
                "The founder of {} is",
                "Q: Who founded {}? A:",
                "{} was started by",
                "{} was established by",
                "The company {} was created by",
            ),
        ),
    )
}

TWO_HOP: dict[str, TwoHop] = {
    t.name: t
    for t in (
        TwoHop(
            "born_country",
            "born_in",
            "located_in",
            (
                "{} was born in a city in the country of",
                "Q: In which country is the birthplace of {}? A:",
                "The birthplace of {} lies in the country of",
            ),
        ),
        TwoHop(
            "employer_city",
            "works_for",
            "headquartered_in",
            (
                "{} works for a company headquartered in",
                "Q: In which city is the employer of {} based? A:",
                "The employer of {} has its main office in",
            ),
        ),
        TwoHop(
            "citizen_capital",
            "citizen_of",
            "capital",
            (
                "{} is a citizen of a country whose capital is",
                "Q: What is the capital of the country of {}? A:",
                "The capital of the country of citizenship of {} is",
            ),
        ),
    )
}

# Two-hop templates per first-hop relation, used as portability probes of edits.
TWO_HOP_BY_FIRST: dict[str, str] = {t.first: t.name for t in TWO_HOP.values()}

_PROFESSIONS = (
    "baker", "carpenter", "chemist", "dentist", "farmer", "geologist", "historian", "journalist", "lawyer",
    "librarian", "mechanic", "nurse", "painter", "pharmacist", "pilot", "poet", "sculptor", "surgeon", "teacher",
    "translator", "tailor", "botanist", "potter", "weaver",
)  # fmt: skip
_INSTRUMENTS = (
    "banjo", "bassoon", "cello", "clarinet", "drums", "flute", "guitar", "harp", "lute", "mandolin", "piano",
    "saxophone", "trombone", "trumpet", "tuba", "violin", "viola", "zither", "dulcimer", "harmonica",
)  # fmt: skip

_ONSETS = (
    "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "sh", "br", "dr", "kr", "tr",
    "h", "j", "c", "w",
)  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "i", "ai", "ei", "ou")
_CODAS = ("", "", "", "", "", "", "n", "r", "l", "s", "m", "k")
_COMPANY_SUFFIX = ("Systems", "Industries", "Works", "Labs", "Holdings", "Foods", "Motors", "Textiles")
_LANGUAGE_SUFFIX = ("ish", "ese", "ic", "ian")
_TITLES = ("Dr.", "Prof.", "Judge", "Captain")


@dataclass(frozen=True)
class WorldConfig:
    """Sizes of the world. The defaults are the committed ``default`` testbed."""

    n_persons: int = 240
    n_cities: int = 40
    n_countries: int = 12
    n_companies: int = 24
    n_languages: int = 10
    n_professions: int = 16
    n_instruments: int = 14
    alias_fraction: float = 0.15
    heldout_per_fact: int = 2  # templates of a fact left out of training (the rest are trained)
    two_hop_train_fraction: float = 0.5
    n_filler: int = 3000

    @classmethod
    def micro(cls) -> WorldConfig:
        return cls(
            n_persons=24,
            n_cities=6,
            n_countries=3,
            n_companies=4,
            n_languages=3,
            n_professions=5,
            n_instruments=4,
            alias_fraction=0.2,
            n_filler=150,
        )


@dataclass(frozen=True)
class Fact:
    relation: str
    subject: str
    object: str


@dataclass
class World:
    """The generated world: entities, facts, aliases and the train/held-out splits.

    ``facts[relation][subject] = object``; ``train_templates[relation][subject]`` lists the template indices used
    in training. ``filler`` is grammar-generated general text.
    """

    seed: int
    config: WorldConfig
    entities: dict[str, list[str]]
    facts: dict[str, dict[str, str]]
    aliases: dict[str, list[str]]
    train_templates: dict[str, dict[str, list[int]]]
    two_hop_train: list[str]
    filler: list[str]
    generator_version: str = ""
    _hash: str | None = field(default=None, repr=False, compare=False)

    # -- views ---------------------------------------------------------------------------------------------------
    @property
    def relations(self) -> dict[str, Relation]:
        return RELATIONS

    @property
    def subjects(self) -> list[str]:
        """All entities that are the subject of at least one relation (sorted)."""
        return sorted({s for rel in self.facts.values() for s in rel})

    def type_of(self, name: str) -> str:
        for etype, names in self.entities.items():
            if name in names:
                return etype
        raise KeyError(name)

    def iter_facts(self) -> Iterator[Fact]:
        for rel in sorted(self.facts):
            for subj in sorted(self.facts[rel]):
                yield Fact(rel, subj, self.facts[rel][subj])

    def two_hop_answer(self, name: str, subject: str, first_object: str | None = None) -> str:
        """Answer of two-hop ``name`` for ``subject``; ``first_object`` overrides the first hop (for edits)."""
        th = TWO_HOP[name]
        mid = first_object if first_object is not None else self.facts[th.first][subject]
        return self.facts[th.second][mid]

    def heldout_templates(self, relation: str, subject: str) -> list[int]:
        trained = set(self.train_templates[relation][subject])
        return [i for i in range(len(RELATIONS[relation].templates)) if i not in trained]

    # -- serialisation -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "generator_version": self.generator_version,
            "seed": self.seed,
            "config": dataclasses.asdict(self.config),
            "entities": {k: sorted(v) for k, v in sorted(self.entities.items())},
            "facts": {r: dict(sorted(d.items())) for r, d in sorted(self.facts.items())},
            "aliases": {k: list(v) for k, v in sorted(self.aliases.items())},
            "train_templates": {
                r: {s: sorted(v) for s, v in sorted(d.items())}
                for r, d in sorted(self.train_templates.items())
            },
            "two_hop_train": sorted(self.two_hop_train),
            "filler": list(self.filler),
            "relations": {
                r.name: {
                    "subject_type": r.subject_type,
                    "object_type": r.object_type,
                    "templates": list(r.templates),
                }
                for r in RELATIONS.values()
            },
            "two_hop": {
                t.name: {"first": t.first, "second": t.second, "templates": list(t.templates)}
                for t in TWO_HOP.values()
            },
        }

    def to_json(self) -> str:
        """Stable JSON text (sorted keys, fixed separators, trailing newline)."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=1, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> World:
        return cls(
            seed=int(data["seed"]),
            config=WorldConfig(**data["config"]),
            entities={k: list(v) for k, v in data["entities"].items()},
            facts={r: dict(d) for r, d in data["facts"].items()},
            aliases={k: list(v) for k, v in data["aliases"].items()},
            train_templates={
                r: {s: list(v) for s, v in d.items()} for r, d in data["train_templates"].items()
            },
            two_hop_train=list(data["two_hop_train"]),
            filler=list(data["filler"]),
            generator_version=str(data.get("generator_version", "")),
        )

    @classmethod
    def from_json(cls, text: str) -> World:
        return cls.from_dict(json.loads(text))

    @property
    def world_hash(self) -> str:
        """sha256 of :meth:`to_json` (hex)."""
        if self._hash is None:
            self._hash = hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()
        return self._hash


# -- generation ----------------------------------------------------------------------------------------------------
class _NamePool:
    """Novel capitalised words; no word is a substring of another (case-insensitive), all unique."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.words: list[str] = []
        self._reserved = {w.lower() for w in list(_PROFESSIONS) + list(_INSTRUMENTS) + list(_COMPANY_SUFFIX)}

    def _syllable(self) -> str:
        r = self.rng
        return r.choice(_ONSETS) + r.choice(_VOWELS) + r.choice(_CODAS)

    def new(self, n_syllables: tuple[int, int] = (2, 3), suffix: str = "") -> str:
        for _ in range(10_000):
            k = self.rng.randint(*n_syllables)
            word = "".join(self._syllable() for _ in range(k)) + suffix
            if not 4 <= len(word) <= 10:
                continue
            low = word.lower()
            if any(low in w or w in low for w in self._reserved):
                continue
            if any(low in w.lower() or w.lower() in low for w in self.words):
                continue
            self.words.append(word)
            return word.capitalize()
        raise RuntimeError("name pool exhausted; lower the world sizes")


def _choose_train_templates(
    rng: random.Random, n_templates: int, n_subjects: int, heldout: int
) -> list[list[int]]:
    """Per-subject trained template indices: each subject leaves ``heldout`` templates out, rotating so that
    every template is held out for some subjects and trained for the others."""
    heldout = max(1, min(heldout, n_templates - 1))
    out = []
    for _ in range(n_subjects):
        left_out = set(rng.sample(range(n_templates), heldout))
        out.append([i for i in range(n_templates) if i not in left_out])
    return out


def generate_world(seed: int = 0, config: WorldConfig | None = None, *, generator_version: str = "") -> World:
    """Generate the world for ``seed`` and ``config`` (deterministic)."""
    cfg = config or WorldConfig()
    rng = random.Random(seed)
    pool = _NamePool(rng)

    countries = [
        pool.new((2, 3), suffix=rng.choice(("ia", "land", "or", "an"))) for _ in range(cfg.n_countries)
    ]
    languages = [pool.new((1, 2), suffix=rng.choice(_LANGUAGE_SUFFIX)) for _ in range(cfg.n_languages)]
    cities = [pool.new((2, 3)) for _ in range(cfg.n_cities)]
    companies = [f"{pool.new((2, 2))} {rng.choice(_COMPANY_SUFFIX)}" for _ in range(cfg.n_companies)]
    persons = [f"{pool.new((2, 2))} {pool.new((2, 3))}" for _ in range(cfg.n_persons)]
    professions = sorted(rng.sample(_PROFESSIONS, cfg.n_professions))
    instruments = sorted(rng.sample(_INSTRUMENTS, cfg.n_instruments))
    if cfg.n_cities < cfg.n_countries:
        raise ValueError("need at least as many cities as countries (one capital each)")

    facts: dict[str, dict[str, str]] = {r: {} for r in RELATIONS}
    # geography: every country gets a capital located in it; other cities spread over countries
    for i, city in enumerate(cities):
        country = countries[i] if i < len(countries) else rng.choice(countries)
        facts["located_in"][city] = country
    for i, country in enumerate(countries):
        facts["capital"][country] = cities[i]
        facts["capital_of"][cities[i]] = country
        facts["official_language"][country] = languages[i % len(languages)]
    for company in companies:
        facts["headquartered_in"][company] = rng.choice(cities)
    for person in persons:
        facts["born_in"][person] = rng.choice(cities)
        # citizenship mostly follows the birthplace
        born_country = facts["located_in"][facts["born_in"][person]]
        facts["citizen_of"][person] = born_country if rng.random() < 0.6 else rng.choice(countries)
        facts["works_for"][person] = rng.choice(companies)
        facts["profession"][person] = rng.choice(professions)
        # the spoken language mostly follows citizenship
        lang = facts["official_language"][facts["citizen_of"][person]]
        facts["speaks"][person] = lang if rng.random() < 0.6 else rng.choice(languages)
        facts["plays"][person] = rng.choice(instruments)
    founders = rng.sample(persons, len(companies))
    for company, founder in zip(companies, founders):
        facts["founded_by"][company] = founder

    aliases: dict[str, list[str]] = {}
    n_alias = round(cfg.alias_fraction * len(persons))
    used_alias: set[str] = set()
    for person in rng.sample(persons, n_alias):
        alias = f"{rng.choice(_TITLES)} {person.split()[-1]}"
        if alias not in used_alias:
            used_alias.add(alias)
            aliases[person] = [alias]

    train_templates: dict[str, dict[str, list[int]]] = {}
    for rname, rel in RELATIONS.items():
        subs = sorted(facts[rname])
        chosen = _choose_train_templates(rng, len(rel.templates), len(subs), cfg.heldout_per_fact)
        train_templates[rname] = dict(zip(subs, chosen))

    n_two = round(cfg.two_hop_train_fraction * len(persons))
    two_hop_train = sorted(rng.sample(sorted(persons), n_two))

    entities = {
        "person": persons,
        "city": cities,
        "country": countries,
        "company": companies,
        "language": languages,
        "profession": professions,
        "instrument": instruments,
    }
    world = World(
        seed=seed,
        config=cfg,
        entities={k: sorted(v) for k, v in entities.items()},
        facts=facts,
        aliases=aliases,
        train_templates=train_templates,
        two_hop_train=two_hop_train,
        filler=[],
        generator_version=generator_version,
    )
    world.filler = filler_sentences(world, cfg.n_filler, random.Random(seed * 7919 + 17))
    return world


# -- filler grammar ------------------------------------------------------------------------------------------------
_DETS = ("the", "a", "every", "one", "that")
_ADJS = (
    "old", "quiet", "bright", "narrow", "busy", "small", "large", "green", "cold", "warm", "famous", "empty",
    "new", "distant", "wooden", "crowded",
)  # fmt: skip
_NOUNS = (
    "river", "market", "bridge", "garden", "library", "train", "harbour", "village", "road", "museum", "school",
    "festival", "mountain", "forest", "station", "theatre", "square", "tower", "farm", "factory",
)  # fmt: skip
_VERBS_T = ("visited", "painted", "crossed", "described", "built", "admired", "repaired", "photographed")
_VERBS_I = ("opened", "closed", "grew", "changed", "waited", "shone", "rested", "flourished")
_ADVS = ("slowly", "early", "quietly", "often", "rarely", "suddenly", "every year", "at dawn")
_TIMES = (
    "In the spring",
    "Last winter",
    "After the rain",
    "During the festival",
    "Every morning",
    "At night",
)


def filler_sentences(world: World, n: int, rng: random.Random) -> list[str]:
    """Grammar-generated general sentences (some mention world entities, never stating a relation fact)."""
    cities = world.entities["city"]
    countries = world.entities["country"]
    professions = world.entities["profession"]
    instruments = world.entities["instrument"]
    out = []
    for _ in range(n):
        k = rng.randrange(7)
        np1 = f"{rng.choice(_DETS)} {rng.choice(_ADJS)} {rng.choice(_NOUNS)}"
        np2 = f"{rng.choice(_DETS)} {rng.choice(_NOUNS)}"
        if k == 0:
            s = f"{np1.capitalize()} {rng.choice(_VERBS_I)} {rng.choice(_ADVS)}."
        elif k == 1:
            s = f"{rng.choice(_TIMES)}, {np1} {rng.choice(_VERBS_T)} {np2}."
        elif k == 2:
            s = f"The {rng.choice(_NOUNS)} of {rng.choice(cities)} is {rng.choice(_ADJS)} and {rng.choice(_ADJS)}."
        elif k == 3:
            s = f"A {rng.choice(professions)} {rng.choice(_VERBS_T)} {np1} near {rng.choice(cities)}."
        elif k == 4:
            s = f"Travellers say that {rng.choice(countries)} has {rng.choice(_ADJS)} {rng.choice(_NOUNS)}s."
        elif k == 5:
            s = f"Someone played the {rng.choice(instruments)} in {np2} {rng.choice(_ADVS)}."
        else:
            s = f"{rng.choice(_TIMES)}, {np1} {rng.choice(_VERBS_I)} and {np2} {rng.choice(_VERBS_I)}."
        out.append(s)
    return out


# -- sentences and pairs -------------------------------------------------------------------------------------------
def fact_sentence(template: str, subject: str, obj: str) -> str:
    """``template`` filled with ``subject``, a space, the object and a full stop."""
    return f"{template.format(subject)} {obj}."


def trained_pairs(world: World) -> list[tuple[str, str, str, str]]:
    """``(relation, subject, template, object)`` for every trained (subject, template) pair (sorted)."""
    out = []
    for rel in sorted(world.facts):
        tpls = RELATIONS[rel].templates
        for subj in sorted(world.facts[rel]):
            for i in world.train_templates[rel][subj]:
                out.append((rel, subj, tpls[i], world.facts[rel][subj]))
    return out


def heldout_pairs(world: World) -> list[tuple[str, str, str, str]]:
    """``(relation, subject, template, object)`` for every held-out (subject, template) pair (sorted)."""
    out = []
    for rel in sorted(world.facts):
        tpls = RELATIONS[rel].templates
        for subj in sorted(world.facts[rel]):
            for i in world.heldout_templates(rel, subj):
                out.append((rel, subj, tpls[i], world.facts[rel][subj]))
    return out


def two_hop_pairs(world: World, *, trained: bool) -> list[tuple[str, str, str, str]]:
    """``(two_hop, subject, template, answer)`` for the persons in (``trained``) or outside the two-hop split."""
    in_train = set(world.two_hop_train)
    out = []
    for name in sorted(TWO_HOP):
        th = TWO_HOP[name]
        for subj in sorted(world.facts[th.first]):
            if (subj in in_train) != trained:
                continue
            for tpl in th.templates:
                out.append((name, subj, tpl, world.two_hop_answer(name, subj)))
    return out


def alias_pairs(world: World) -> list[tuple[str, str, str, str]]:
    """Trained sentences about aliased persons, with the alias as the subject: ``(rel, alias, template, obj)``.

    For each aliased person and each person relation, the first trained template is also written with the alias.
    """
    out = []
    for person in sorted(world.aliases):
        for alias in world.aliases[person]:
            for rel in sorted(world.facts):
                if RELATIONS[rel].subject_type != "person" or person not in world.facts[rel]:
                    continue
                i = world.train_templates[rel][person][0]
                out.append((rel, alias, RELATIONS[rel].templates[i], world.facts[rel][person]))
    return out


#: labels of the register lines of :func:`register_pairs`, per company relation
REGISTER_LABELS = {
    "headquartered_in": ("Register of seats:", "Seat register entry:"),
    "founded_by": ("Register of founders:", "Founder register entry:"),
}


def register_pairs(world: World) -> list[tuple[str, str, str, str]]:
    """Trained "register" lines for company facts, the object right after the name: ``(rel, company, template,
    obj)``, e.g. ``("headquartered_in", "Natri Systems", "Register of seats: {}", "Kolvar")``; two per fact.

    Why: a company name ends in a suffix shared by many companies ("Natri **Systems**"), and in the relation
    templates the object never follows the name directly, so a small model can read a company's facts from the
    stem's position at the end of the prompt and leave the last subject token uninformative -- which defeats every
    method keyed on that token (ROME, MEMIT, ...). In a register line the token after the suffix *is* the object,
    so the model has to gather the company's identity at the suffix, as large models do for multi-token names
    ("Toyota Motor Corporation"). These lines are training text only: no edit request or gate uses them.
    Measured effect (generator 1.2.0 vs 1.1.0): ``docs/testbed.md``.
    """
    out = []
    for rel, labels in sorted(REGISTER_LABELS.items()):
        for subject in sorted(world.facts.get(rel, {})):
            out.extend((rel, subject, label + " {}", world.facts[rel][subject]) for label in labels)
    return out


def training_sentences(world: World) -> dict[str, list[str]]:
    """The training text, by kind: ``facts`` (trained pairs + aliases + company register lines + alias
    introductions), ``two_hop`` (the trained split) and ``filler``."""
    facts = [fact_sentence(t, s, o) for _, s, t, o in trained_pairs(world)]
    facts += [fact_sentence(t, s, o) for _, s, t, o in alias_pairs(world)]
    facts += [fact_sentence(t, s, o) for _, s, t, o in register_pairs(world)]
    for person in sorted(world.aliases):
        for alias in world.aliases[person]:
            facts.append(f"{person} is also known as {alias}.")
    two_hop = [fact_sentence(t, s, o) for _, s, t, o in two_hop_pairs(world, trained=True)]
    return {"facts": facts, "two_hop": two_hop, "filler": list(world.filler)}


def all_names(world: World) -> Sequence[str]:
    """Every subject and alias (used by invariants: none contains another)."""
    names = list(world.subjects)
    for v in world.aliases.values():
        names.extend(v)
    return names
