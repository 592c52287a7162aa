"""Natural language -> intent: an edit (a triple), a rollback (an entry id) or a query (a prompt for the model).

OneEdit's interpreter is a tuned chat model that emits ``<edit> (head, relation, tail)``; here the
:class:`Interpreter` protocol is what the service calls, and :class:`RuleInterpreter` implements it with rules
over the relation templates (the testbed's and the relationship library's), so an LLM interpreter can replace it.

Rules, first match wins:

* rollback: ``rollback 12``, ``roll back entry #12``, ``undo edit 12``, ``revert 12``;
* edit: a statement that is a relation template with the subject and an object filled in, e.g. ``"Babra Gaiskim
  was born in Baica."`` for ``"{} was born in"``, or ``"The spouse of Barack Obama is Michelle Obama"`` for
  OneEdit's default templates; an explicit ``(head, relation, tail)`` or ``<edit> (h, r, t)`` also works;
* query: anything else (a question, or a template prompt without an object) is sent to the model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from kedit.service.kg import Relation

__all__ = ["Intent", "Interpreter", "InterpreterError", "RuleInterpreter"]


class InterpreterError(ValueError):
    """The text could not be interpreted."""


@dataclass(frozen=True)
class Intent:
    """``op`` is ``edit`` (``triple`` set), ``rollback`` (``entry_id`` set) or ``query`` (``prompt`` set)."""

    op: str
    triple: tuple[str, str, str] | None = None
    entry_id: int | None = None
    prompt: str | None = None


class Interpreter(Protocol):
    def interpret(self, text: str) -> Intent: ...


_ROLLBACK = re.compile(r"^\s*(?:please\s+)?(?:roll\s*back|undo|revert)\s+(?:the\s+)?(?:edit|entry)?\s*#?(\d+)\s*[.!]?\s*$",
                       re.IGNORECASE)
_EXPLICIT = re.compile(r"^\s*(?:<edit>)?\s*\(\s*([^,()]+?)\s*,\s*([^,()]+?)\s*,\s*([^,()]+?)\s*\)\s*$")


def _template_regex(template: str) -> re.Pattern[str] | None:
    """``"{} was born in"`` -> a pattern for ``"<subject> was born in <object>"`` (None for question templates)."""
    if "?" in template or template.lstrip().startswith("Q:"):
        return None
    before, after = template.split("{}")
    pat = "^" + re.escape(before.strip()).replace(r"\ ", r"\s+")
    pat += (r"\s*" if before.strip() else "") + r"(?P<s>.+?)"
    pat += (r"\s*" if not after.startswith(" ") else r"\s+") if after.strip() else ""
    pat += re.escape(after.strip()).replace(r"\ ", r"\s+") + r"\s+(?P<o>.+?)\s*[.!]?\s*$"
    return re.compile(pat, re.IGNORECASE)


class RuleInterpreter:
    """Rule-based :class:`Interpreter` over ``relations``' prompts (see the module docstring).

    ``normalise(name)`` maps a surface name to the KG's entity name (e.g. ``"Barack Obama"`` ->
    ``"Barack_Obama"``); identity by default.
    """

    def __init__(self, relations: Iterable[Relation], normalise: Callable[[str], str] | None = None) -> None:
        self.relations = {r.name: r for r in relations}
        self.normalise = normalise or (lambda s: s)
        pats = []
        for rel in self.relations.values():
            if rel.multihop:  # composed relations are derived by the KG, not stated
                continue
            for t in rel.prompts:
                p = _template_regex(t)
                if p is not None:
                    pats.append((len(t), rel.name, p))
        # longer templates first: "The city where {} was born is" before "{} was born in"
        self._patterns = [(name, p) for _, name, p in sorted(pats, key=lambda x: -x[0])]

    def interpret(self, text: str) -> Intent:
        if not isinstance(text, str) or not text.strip():
            raise InterpreterError("empty text")
        text = " ".join(text.split())
        m = _ROLLBACK.match(text)
        if m:
            return Intent("rollback", entry_id=int(m.group(1)))
        m = _EXPLICIT.match(text)
        if m:
            h, r, t = (g.strip() for g in m.groups())
            r = r if r in self.relations else r.replace(" ", "_")
            return Intent("edit", triple=(self.normalise(h), r, self.normalise(t)))
        if not text.rstrip().endswith("?"):
            for name, pat in self._patterns:
                m = pat.match(text)
                if m:
                    return Intent("edit", triple=(self.normalise(m.group("s").strip()), name,
                                                  self.normalise(m.group("o").strip())))
        return Intent("query", prompt=text)
