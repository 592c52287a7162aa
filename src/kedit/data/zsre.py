"""zsRE converter: the MEND/ROME question-answering shape and EasyEdit's portability variants.

=========================================  ===================================================================
dataset field                              EditRequest
=========================================  ===================================================================
``src`` (question containing the subject)  ``prompt``
``subject``                                ``subject``
``alt`` (the new answer)                   ``target_new``
``answers`` (list of gold answers)         ``target_true`` = first, the rest -> ``extra["target_true_aliases"]``
``rephrase``                               ``paraphrases``
``loc`` / ``loc_ans``                      ``neighborhood`` (kind ``"neighborhood"``; the prompt keeps its
                                           ``"nq question: "`` prefix, as MEND/ROME/EasyEdit feed it)
``portability{New Question, New Answer}``  ``portability`` (kind ``"one_hop"``; ``Recalled Relation`` ->
                                           ``extra["recalled_relation"]``)
``inverse question``                       ``portability`` (kind ``"inverse_relation"``, answer = subject)
``alternative_subject``                    ``aliases``
``alter_subject_question``                 ``portability`` (kind ``"subject_replace"``, answer = ``alt``)
``pred`` / ``cond``                        ``extra["pred"]`` / ``extra["cond"]``
(no id in the data)                        ``case_id`` = the record's 0-based index (or ``case_id`` if present)
=========================================  ===================================================================

``pred`` is the prediction of the model MEND was trained against, *not* the gold answer, so it is not used as
``target_true``. The target is ``alt`` as in EasyEdit (the ``cond`` string reads ``"pred >> alt || src"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kedit.requests import EditRequest

from ._common import FieldError, answers, build_request, get, leftovers, probe, strings
from .counterfact import PLACEHOLDER_TARGETS, easyedit_portability

__all__ = ["convert_zsre"]

_KEYS = {
    "case_id",
    "subject",
    "src",
    "alt",
    "answers",
    "rephrase",
    "loc",
    "loc_ans",
    "portability",
    "inverse question",
    "alternative_subject",
    "alter_subject_question",
}


def convert_zsre(record: Mapping[str, Any], index: int) -> list[EditRequest]:
    src = get(record, "src")
    subject = get(record, "subject")
    alt = get(record, "alt")
    truth = [a for a in answers(record.get("answers"), "answers") if a not in PLACEHOLDER_TARGETS]
    rephrase = strings(record.get("rephrase"), "rephrase")

    neighborhood = []
    if record.get("loc") not in (None, ""):  # exports write "" when there is no locality question
        loc = get(record, "loc")
        loc_ans = answers(get(record, "loc_ans", types=(str, list)), "loc_ans")
        if not loc_ans:
            raise FieldError("loc_ans", "empty answer for the locality question 'loc'")
        neighborhood.append(probe(loc, loc_ans, "neighborhood", "loc"))

    portability, port_answers, extra_port = easyedit_portability(record.get("portability"), "portability")
    if record.get("inverse question") is not None:
        portability.append(
            probe(get(record, "inverse question"), [subject], "inverse_relation", "inverse question")
        )
        port_answers.append([subject])
    aliases = strings(record.get("alternative_subject"), "alternative_subject")
    if record.get("alter_subject_question") is not None:
        portability.append(
            probe(get(record, "alter_subject_question"), [alt], "subject_replace", "alter_subject_question")
        )
        port_answers.append([alt])

    extra = leftovers(record, _KEYS)
    extra.update(extra_port)
    if len(truth) > 1:
        extra["target_true_aliases"] = truth[1:]
    if any(len(a) > 1 for a in port_answers):
        extra["portability_answers"] = port_answers
    return [
        build_request(
            {
                "prompt": "src",
                "target_new": "alt",
                "target_true": "answers",
                "paraphrases": "rephrase",
                "aliases": "alternative_subject",
            },
            prompt=src,
            subject=subject,
            target_new=alt,
            target_true=truth[0] if truth else None,
            paraphrases=rephrase,
            neighborhood=neighborhood,
            portability=portability,
            aliases=aliases,
            case_id=record.get("case_id", index),
            extra=extra,
        )
    ]
