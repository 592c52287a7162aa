"""MQuAKE converter (MQuAKE-CF / -CF-3k / -T / -hard record shape) -> :class:`~kedit.data.MQuAKECase`.

Each ``requested_rewrite`` entry ``{prompt, subject, target_new{str,id}, target_true{str,id}, relation_id,
question}`` becomes an :class:`EditRequest` (``case_id`` ``"<case_id>#<i>"``; ``relation_id``, ``question``,
Wikidata ids in ``extra``). Aliases of the new object are taken from the ``new_single_hops`` entry asking the
same question (or with the same cloze) and answering ``target_new``, into ``extra["target_aliases"]``; aliases of
the old object likewise from ``single_hops`` into ``extra["target_true_aliases"]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ._common import FieldError, answers, get, leftovers, mapping, strings
from .counterfact import convert_counterfact
from .records import MQuAKECase, MQuAKEHop

__all__ = ["convert_mquake"]

_KEYS = {
    "case_id",
    "requested_rewrite",
    "questions",
    "answer",
    "answer_alias",
    "new_answer",
    "new_answer_alias",
    "single_hops",
    "new_single_hops",
}


def _hops(record: Mapping[str, Any], key: str) -> tuple[MQuAKEHop, ...]:
    raw = record.get(key)
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise FieldError(key, f"expected a list of hops, got {type(raw).__name__}")
    out = []
    for i, hop in enumerate(raw):
        where = f"{key}[{i}]"
        hop = mapping(hop, where)
        answer = get(hop, "answer", where=where).strip()
        aliases = [a for a in answers(hop.get("answer_alias"), f"{where}.answer_alias") if a != answer]
        out.append(
            MQuAKEHop(
                question=get(hop, "question", where=where),
                cloze=get(hop, "cloze", where=where, required=False, default=""),
                answer=answer,
                aliases=tuple(aliases),
            )
        )
    return tuple(out)


def _aliases_for(hops: tuple[MQuAKEHop, ...], question: Any, cloze: str, answer: str | None) -> list[str]:
    for hop in hops:
        if (hop.question == question or (hop.cloze and hop.cloze == cloze)) and hop.answer == answer:
            return list(hop.aliases)
    return []


def convert_mquake(record: Mapping[str, Any], index: int) -> list[MQuAKECase]:
    case_id = record.get("case_id", index)
    raw = record.get("requested_rewrite")
    if raw is None:
        raise FieldError("requested_rewrite", "missing required field")
    rewrites = raw if isinstance(raw, list) else [raw]
    edits = convert_counterfact({"case_id": case_id, "requested_rewrite": rewrites}, index)
    single = _hops(record, "single_hops")
    new_single = _hops(record, "new_single_hops")
    enriched = []
    for j, edit in enumerate(edits):
        extra = dict(edit.extra)
        extra["rewrite_index"] = j
        extra["mquake_case_id"] = case_id
        question = extra.get("question")
        new_alias = _aliases_for(new_single, question, edit.text, edit.target_new)
        if new_alias:
            extra["target_aliases"] = new_alias
        old_alias = _aliases_for(single, question, edit.text, edit.target_true)
        if old_alias:
            extra["target_true_aliases"] = old_alias
        enriched.append(dataclasses.replace(edit, case_id=f"{case_id}#{j}", extra=extra))

    questions = strings(get(record, "questions", types=(list, str)), "questions", allow_empty_list=False)
    answer = get(record, "answer").strip()
    new_answer = get(record, "new_answer").strip()
    return [
        MQuAKECase(
            case_id=str(case_id),
            edits=tuple(enriched),
            questions=tuple(questions),
            answer=answer,
            new_answer=new_answer,
            answer_aliases=tuple(
                a for a in answers(record.get("answer_alias"), "answer_alias") if a != answer
            ),
            new_answer_aliases=tuple(
                a for a in answers(record.get("new_answer_alias"), "new_answer_alias") if a != new_answer
            ),
            single_hops=single,
            new_single_hops=new_single,
            extra=leftovers(record, _KEYS),
        )
    ]
