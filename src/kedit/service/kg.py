"""The knowledge graph controller: triples, OneEdit's relationship library, conflict resolution and expansion.

OneEdit (Zhang et al., "OneEdit: A Neural-Symbolic Collaboratively Knowledge Editing System", arXiv 2409.07497)
keeps a KG as the source of truth. Each relation of its *relationship library* has a ``type`` (``one2one``,
``one2many`` or unspecified), a ``reverse`` relation and a ``multihop`` composition ``[r1, r2]``. Resolving an
edit ``(h, r, t)`` (:meth:`KGController.resolve`):

1. coverage conflict: when ``(h, r, t_old)`` exists with ``t_old != t`` and ``r`` is not ``one2many``, the old
   triple and its reverse ``(t_old, r_rev, h)`` are removed (recorded in ``rollback``);
2. ``(h, r, t)`` and its reverse ``(t, r_rev, h)`` are added (``edit``);
3. augmentation: up to ``augment`` out-edges of the new tail are added to the edit list (OneEdit's
   ``kg_augment_num``), and every relation whose ``multihop`` is ``[r1, r2]`` composes chains ``a -r1-> b -r2-> c``
   through the new triple into ``(a, r_comp, c)``;
4. both lists are de-duplicated.

The controller works over a :class:`TripleStore` (in memory, or the service's database table); ``apply`` and
``undo`` change the store (``apply`` records the net change, which ``undo`` reverses exactly), and
``roll_back`` removes any committed entry as a replay of the later ones would, so the service can roll the KG back
together with the model. The testbed world
(:func:`testbed_library`, :func:`testbed_triples`) is the KG of the testbed models; :func:`load_oneedit` reads
OneEdit's ``kg.csv`` and ``relationship_library.json``.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["DbStore", "KGController", "KGError", "MemoryStore", "load_library", "store_library", "Relation", "Resolution", "Triple", "TripleStore",
           "UnknownRelationError", "default_templates", "load_oneedit", "parse_library", "parse_triples_csv",
           "testbed_library", "testbed_triples", "triple_requests"]

Triple = tuple[str, str, str]


class KGError(ValueError):
    """Malformed KG input."""


class UnknownRelationError(KGError):
    """A relation that is not in the relationship library (OneEdit asks the user; a service refuses)."""


def _words(name: str) -> str:
    return name.replace("_", " ").strip()


def default_templates(relation: str) -> tuple[str, ...]:
    """OneEdit's two prompts per triple: ``"The {r} of {s} is"`` and ``"{s}'s {r} is"`` (underscores as spaces)."""
    r = _words(relation)
    return (f"The {r} of {{}} is", f"{{}}'s {r} is")


@dataclass(frozen=True)
class Relation:
    """A relationship-library record (``multihop`` is ``()`` or ``(r1, r2)``; ``templates`` each hold one ``{}``)."""

    name: str
    type: str = ""
    reverse: str = ""
    multihop: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise KGError("a relation needs a non-empty name")
        if self.type not in ("", "one2one", "one2many"):
            raise KGError(f"relation {self.name!r}: type must be one2one, one2many or empty, got {self.type!r}")
        if self.multihop and len(self.multihop) != 2:
            raise KGError(f"relation {self.name!r}: multihop must name two relations, got {list(self.multihop)}")
        for t in self.templates:
            if t.count("{}") != 1:
                raise KGError(f"relation {self.name!r}: template {t!r} must hold exactly one '{{}}'")

    @property
    def prompts(self) -> tuple[str, ...]:
        return self.templates or default_templates(self.name)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "reverse": self.reverse, "multihop": list(self.multihop),
                "templates": list(self.templates)}


@dataclass
class Resolution:
    """What an edit implies: triples to write (``edit``) and triples it removes (``rollback``).

    ``added`` / ``removed``: set by :meth:`KGController.apply` -- the net change it made to the store (the
    ``edit`` triples that were not there yet, the ``rollback`` triples that were), which is what
    :meth:`KGController.undo` reverses exactly. ``None`` before it is applied (and in entries stored before these
    fields existed: their undo falls back to the two lists)."""

    edit: list[Triple] = field(default_factory=list)
    rollback: list[Triple] = field(default_factory=list)
    added: list[Triple] | None = None
    removed: list[Triple] | None = None

    def to_dict(self) -> dict[str, list[list[str]]]:
        out = {"edit": [list(t) for t in self.edit], "rollback": [list(t) for t in self.rollback]}
        if self.added is not None and self.removed is not None:
            out["added"] = [list(t) for t in self.added]
            out["removed"] = [list(t) for t in self.removed]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Resolution:
        def triples(key: str) -> list[Triple] | None:
            return None if key not in data else [tuple(t) for t in data[key]]

        return cls(triples("edit") or [], triples("rollback") or [], triples("added"), triples("removed"))


class TripleStore(Protocol):
    def has(self, triple: Triple) -> bool: ...
    def tails(self, head: str, relation: str) -> list[str]: ...
    def out_edges(self, head: str) -> list[Triple]: ...
    def in_edges(self, tail: str) -> list[Triple]: ...
    def add(self, triple: Triple) -> None: ...
    def remove(self, triple: Triple) -> None: ...


class MemoryStore:
    """A :class:`TripleStore` in memory (insertion-ordered)."""

    def __init__(self, triples: Iterable[Triple] = ()) -> None:
        self._t: dict[Triple, None] = {}
        for t in triples:
            self.add(t)

    def __len__(self) -> int:
        return len(self._t)

    def __iter__(self):
        return iter(list(self._t))

    def has(self, triple: Triple) -> bool:
        return tuple(triple) in self._t

    def tails(self, head: str, relation: str) -> list[str]:
        return [t for h, r, t in self._t if h == head and r == relation]

    def out_edges(self, head: str) -> list[Triple]:
        return [x for x in self._t if x[0] == head]

    def in_edges(self, tail: str) -> list[Triple]:
        return [x for x in self._t if x[2] == tail]

    def add(self, triple: Triple) -> None:
        self._t[_check_triple(triple)] = None

    def remove(self, triple: Triple) -> None:
        self._t.pop(tuple(triple), None)


def _check_triple(triple: Sequence[str]) -> Triple:
    if len(triple) != 3 or not all(isinstance(x, str) and x.strip() for x in triple):
        raise KGError(f"a triple is three non-empty strings (head, relation, tail), got {list(triple)!r}")
    return (triple[0].strip(), triple[1].strip(), triple[2].strip())


def _dedup(triples: Iterable[Triple]) -> list[Triple]:
    return list(dict.fromkeys(triples))


class KGController:
    """Resolves edits against ``store`` with the relationship ``library`` (see the module docstring)."""

    def __init__(self, store: TripleStore, library: Iterable[Relation], *, augment: int = 0,
                 symbolic_rules: bool = True) -> None:
        self.store = store
        self.library: dict[str, Relation] = {r.name: r for r in library}
        self.augment = augment
        self.symbolic_rules = symbolic_rules

    def relation(self, name: str) -> Relation:
        try:
            return self.library[name]
        except KeyError:
            raise UnknownRelationError(f"unknown relation {name!r}; the library has: "
                                       f"{', '.join(sorted(self.library)) or '(none)'}") from None

    def _reverse(self, triple: Triple) -> Triple | None:
        rel = self.library.get(triple[1])
        return (triple[2], rel.reverse, triple[0]) if rel is not None and rel.reverse else None

    def resolve(self, triple: Sequence[str]) -> Resolution:
        """The edit and rollback lists for ``triple`` (the store is not changed; see :meth:`apply`)."""
        h, r, t = _check_triple(triple)
        self.relation(r)
        res = Resolution()
        self._replace((h, r, t), res)
        res.edit.append((h, r, t))
        rev = self._reverse((h, r, t))
        if rev is not None:
            self._replace(rev, res)
            res.edit.append(rev)
        if self.augment:
            res.edit.extend(self.store.out_edges(t)[: self.augment])
        if self.symbolic_rules:
            for comp in self._compose((h, r, t), res):
                self._replace(comp, res)
                res.edit.append(comp)
        res.edit = _dedup(res.edit)
        res.rollback = [x for x in _dedup(res.rollback) if x not in res.edit]
        return res

    def _replace(self, triple: Triple, res: Resolution) -> None:
        """The coverage conflict: a new ``(h, r, t)`` of a relation that is not one2many replaces every
        ``(h, r, t_old)`` and its reverse (recorded in ``res.rollback``)."""
        h, r, t = triple
        rel = self.library.get(r)
        if (rel is not None and rel.type == "one2many") or self.store.has(triple):
            return
        for old in self.store.tails(h, r):
            if old == t:
                continue
            res.rollback.append((h, r, old))
            rev = self._reverse((h, r, old))
            if rev is not None and self.store.has(rev):
                res.rollback.append(rev)

    def _compose(self, new: Triple, res: Resolution) -> list[Triple]:
        """Multi-hop triples through ``new``: for each relation ``c`` with ``multihop == (r1, r2)``, chains
        ``a -r1-> b -r2-> x`` where ``new`` is one of the two hops (the KG as it will be after ``res``)."""
        removed = set(res.rollback)

        def tails(head: str, relation: str) -> list[str]:
            out = [x for x in self.store.tails(head, relation) if (head, relation, x) not in removed]
            out += [x[2] for x in res.edit if x[0] == head and x[1] == relation and x[2] not in out]
            return out

        def heads(tail: str, relation: str) -> list[str]:
            out = [x[0] for x in self.store.in_edges(tail) if x[1] == relation and x not in removed]
            out += [x[0] for x in res.edit if x[2] == tail and x[1] == relation and x[0] not in out]
            return out

        h, r, t = new
        found: list[Triple] = []
        for comp in self.library.values():
            if not comp.multihop:
                continue
            r1, r2 = comp.multihop
            if r == r1:
                found += [(h, comp.name, c) for c in tails(t, r2)]
            if r == r2:
                found += [(a, comp.name, t) for a in heads(h, r1)]
        return found

    def resolve_all(self, triples: Iterable[Sequence[str]]) -> Resolution:
        """One entry's resolution: each stated triple resolved against the store as it is, the lists merged
        (de-duplicated, in order)."""
        res = Resolution()
        for t in triples:
            r = self.resolve(t)
            res.edit += [x for x in r.edit if x not in res.edit]
            res.rollback += [x for x in r.rollback if x not in res.rollback]
        return res

    def apply(self, res: Resolution) -> Resolution:
        """Remove ``res.rollback``, add ``res.edit``; records the net change in ``res.added`` / ``res.removed``
        (returns ``res``)."""
        removed = [x for x in res.rollback if self.store.has(x)]
        for x in removed:
            self.store.remove(x)
        added = [x for x in res.edit if not self.store.has(x)]
        for x in added:
            self.store.add(x)
        res.added, res.removed = added, removed
        return res

    def undo(self, res: Resolution) -> None:
        """Undo :meth:`apply` of ``res`` exactly (when nothing changed the store since): remove what it added,
        restore what it removed. A resolution without the net change (stored before it was recorded) removes every
        ``edit`` triple and restores every ``rollback`` one."""
        added = res.edit if res.added is None else res.added
        removed = res.rollback if res.removed is None else res.removed
        for x in added:
            self.store.remove(x)
        for x in removed:
            self.store.add(x)

    def roll_back(self, entries: Sequence[tuple[Iterable[Sequence[str]], Resolution]]) -> list[Resolution]:
        """Roll back the first of ``entries`` -- ``(stated triples, applied resolution)`` of the committed entries
        from the one rolled back to the newest, in commit order -- so that the store equals the KG before it plus
        the later entries replayed: every entry is undone (newest first), then each later one is resolved again
        and applied, against the KG as it is without the rolled-back entry. (Undoing only the rolled-back entry's
        lists is wrong once a later entry superseded it: undoing ``(s, r, a)`` replacing ``(s, r, orig)`` after
        ``(s, r, b)`` replaced ``(s, r, a)`` would put ``orig`` back beside ``b``.) Returns the later entries' new
        resolutions, in order, for the ledger to store."""
        if not entries:
            raise ValueError("roll_back needs at least the entry to roll back")
        for _, res in reversed(entries):
            self.undo(res)
        return [self.apply(self.resolve_all(triples)) for triples, _ in entries[1:]]

    def neighbourhood(self, entity: str) -> dict[str, list[list[str]]]:
        return {"out": [list(x) for x in self.store.out_edges(entity)],
                "in": [list(x) for x in self.store.in_edges(entity)]}


def triple_requests(triple: Triple, relation: Relation, *, n_templates: int | None = None) -> list[dict[str, str]]:
    """The edit requests a triple becomes: one per template (the first ``n_templates``), subject = head, target =
    tail (underscores as spaces, as OneEdit's editor does)."""
    h, _, t = triple
    prompts = relation.prompts[:n_templates] if n_templates else relation.prompts
    return [{"prompt": p, "subject": _words(h), "target_new": _words(t)} for p in prompts]


# -- loading -------------------------------------------------------------------------------------------------------
def _multihop(value: Any, name: str) -> tuple[str, ...]:
    if value in (None, "", []):
        return ()
    if isinstance(value, list):
        return tuple(str(v) for v in value)
    if isinstance(value, str):  # OneEdit writes "['father','father']"
        parts = re.findall(r"'([^']*)'|\"([^\"]*)\"", value)
        names = tuple(a or b for a, b in parts)
        if names:
            return names
    raise KGError(f"relation {name!r}: cannot read multihop {value!r}")


def parse_library(text: str) -> list[Relation]:
    """Relations from OneEdit's ``relationship_library.json`` (a list of {name, type, reverse, multihop}; an
    optional ``templates`` list is kept). A relation named twice: the last record wins."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise KGError(f"relationship library is not JSON: {e}") from None
    if not isinstance(data, list):
        raise KGError("relationship library must be a JSON list of records")
    out: dict[str, Relation] = {}
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or not isinstance(rec.get("name"), str):
            raise KGError(f"relationship library record {i + 1}: needs a string 'name'")
        name = rec["name"]
        out[name] = Relation(name=name, type=rec.get("type") or "", reverse=rec.get("reverse") or "",
                             multihop=_multihop(rec.get("multihop"), name),
                             templates=tuple(rec.get("templates") or ()))
    return list(out.values())


def parse_triples_csv(text: str) -> list[Triple]:
    """Triples from OneEdit's ``kg.csv`` (header ``head,relation,tail``)."""
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or [c.strip() for c in rows[0]] != ["head", "relation", "tail"]:
        raise KGError("kg.csv must start with the header head,relation,tail")
    out = []
    for n, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 3:
            raise KGError(f"kg.csv line {n}: expected 3 fields, got {len(row)}")
        out.append(_check_triple(row))
    return _dedup(out)


def load_oneedit(kg_csv: str, library_json: str) -> tuple[list[Triple], list[Relation]]:
    """OneEdit's KG files (their text). Relations used by the triples but missing from the library are added with
    an empty type (OneEdit would ask the user), so the import never drops a triple."""
    triples = parse_triples_csv(kg_csv)
    library = {r.name: r for r in parse_library(library_json)}
    for _, r, _ in triples:
        library.setdefault(r, Relation(r))
    return triples, list(library.values())


def testbed_library(world: Any = None) -> list[Relation]:
    """The testbed world's relations (one2one: each subject has one object; ``capital`` and ``capital_of`` are
    each other's reverse) with their templates, and its two-hop compositions as ``multihop`` relations."""
    from kedit.testbed.world import RELATIONS, TWO_HOP

    reverse = {"capital": "capital_of", "capital_of": "capital"}  # a country's capital city, and back
    rels = [Relation(r.name, "one2one", reverse.get(r.name, ""), (), tuple(r.templates)) for r in RELATIONS.values()]
    rels += [Relation(th.name, "one2one", "", (th.first, th.second), tuple(th.templates)) for th in TWO_HOP.values()]
    return rels


def testbed_triples(world: Any = None) -> list[Triple]:
    """Every fact of the testbed world as a triple (the embedded world by default)."""
    if world is None:
        from kedit.testbed import load_world

        world = load_world()
    return [(f.subject, f.relation, f.object) for f in world.iter_facts()]


class DbStore:
    """A :class:`TripleStore` over the service database's ``triples`` table (changes join ``session``'s
    transaction, so the KG and the ledger commit together)."""

    def __init__(self, session: Any) -> None:
        self.session = session

    def _q(self, *where: Any) -> list[Triple]:
        from sqlalchemy import select

        from kedit.service.models import TripleRow

        rows = self.session.execute(select(TripleRow.head, TripleRow.relation, TripleRow.tail).where(*where)
                                    .order_by(TripleRow.id)).all()
        return [tuple(r) for r in rows]

    def has(self, triple: Triple) -> bool:
        from kedit.service.models import TripleRow

        h, r, t = triple
        return bool(self._q(TripleRow.head == h, TripleRow.relation == r, TripleRow.tail == t))

    def tails(self, head: str, relation: str) -> list[str]:
        from kedit.service.models import TripleRow

        return [t for _, _, t in self._q(TripleRow.head == head, TripleRow.relation == relation)]

    def out_edges(self, head: str) -> list[Triple]:
        from kedit.service.models import TripleRow

        return self._q(TripleRow.head == head)

    def in_edges(self, tail: str) -> list[Triple]:
        from kedit.service.models import TripleRow

        return self._q(TripleRow.tail == tail)

    def add(self, triple: Triple) -> None:
        from kedit.service.models import TripleRow

        h, r, t = _check_triple(triple)
        if not self.has((h, r, t)):
            self.session.add(TripleRow(head=h, relation=r, tail=t))
            self.session.flush()

    def remove(self, triple: Triple) -> None:
        from sqlalchemy import delete

        from kedit.service.models import TripleRow

        h, r, t = triple
        self.session.execute(delete(TripleRow).where(TripleRow.head == h, TripleRow.relation == r,
                                                     TripleRow.tail == t))

    def count(self) -> int:
        from sqlalchemy import func, select

        from kedit.service.models import TripleRow

        return int(self.session.scalar(select(func.count()).select_from(TripleRow)) or 0)

    def bulk_add(self, triples: Iterable[Triple]) -> int:
        """Add the triples not yet present (one query for the existing ones); returns how many were added."""
        from sqlalchemy import select

        from kedit.service.models import TripleRow

        existing = set(self.session.execute(select(TripleRow.head, TripleRow.relation, TripleRow.tail)).all())
        new = [t for t in _dedup(_check_triple(x) for x in triples) if t not in existing]
        self.session.add_all([TripleRow(head=h, relation=r, tail=t) for h, r, t in new])
        self.session.flush()
        return len(new)


def load_library(session: Any) -> list[Relation]:
    from sqlalchemy import select

    from kedit.service.models import RelationRow

    return [Relation(r.name, r.type, r.reverse, tuple(r.multihop or ()), tuple(r.templates or ()))
            for r in session.scalars(select(RelationRow).order_by(RelationRow.name))]


def store_library(session: Any, relations: Iterable[Relation]) -> int:
    """Insert or update library records; an update without templates keeps the stored ones."""
    from kedit.service.models import RelationRow

    n = 0
    for rel in relations:
        row = session.get(RelationRow, rel.name)
        if row is None:
            session.add(RelationRow(name=rel.name, type=rel.type, reverse=rel.reverse, multihop=list(rel.multihop),
                                    templates=list(rel.templates)))
        else:
            row.type, row.reverse, row.multihop = rel.type or row.type, rel.reverse or row.reverse, \
                list(rel.multihop) or row.multihop
            if rel.templates:
                row.templates = list(rel.templates)
        n += 1
    session.flush()
    return n
