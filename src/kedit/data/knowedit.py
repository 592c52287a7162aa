"""KnowEdit converters: ZsRE-test-all, wiki_counterfact, wiki_recent, WikiBio, Sanitation, ConvSent.

Fact-edit files (ZsRE, wiki_counterfact, wiki_recent, WikiBio) -> :class:`EditRequest`:

==========================================  ==================================================================
dataset field                               EditRequest
==========================================  ==================================================================
``prompt`` (WikiBio: ``text``)              ``prompt`` (contains the subject verbatim)
``subject`` (WikiBio: ``concept``)          ``subject``
``target_new`` (WikiBio: ``labels``)        ``target_new``
``ground_truth`` (str, list or absent)      ``target_true`` = first answer, the rest ->
                                            ``extra["target_true_aliases"]``
``rephrase_prompt``                         ``paraphrases``
``locality{section: [{prompt,               ``neighborhood``, one probe per prompt, kind = section name
ground_truth}]}``                           (``Relation_Specificity``, ``Forgetfulness``)
``portability{section: [...]}``             ``portability``, kind = section name (``Reasoning``,
                                            ``Subject_Aliasing``, ``Logical_Generalization``)
``cond``, anything else                     ``extra[key]``
(no id in the data)                         ``case_id`` = the record's 0-based index
==========================================  ==================================================================

A probe's ``ground_truth`` may be a string, a list of aliases, or (wiki_recent) a list of answers each given as a
list of aliases, possibly empty. The probe's ``answer`` is the first alias of the first non-empty answer
(``None`` when there is none: compare with the pre-edit model); when any probe of a list has more than one
acceptable string, ``extra["neighborhood_answers"]`` / ``extra["portability_answers"]`` hold, aligned with the
probes, every acceptable string for exact-match metrics.

WikiBio is hallucination correction: the "target" is a whole continuation sentence, the subject the lower-cased
``concept`` as it appears in the passage's first sentence.

Sanitation (``{"success": [...], "locality": [...]}``; also the train split ``{"K_F": [...], "K_R": [...]}``):
each ``success`` / ``K_F`` item ``{question, ground_truth, target_new}`` -> an :class:`EditRequest` with
``target_new`` = ``"I don't know."`` and ``target_true`` = ``ground_truth``. The items name no subject (unless a
``subject`` key is present): the whole question is then the subject (``prompt="{}"``, flagged by
``extra["subject_is_question"] = True``), so subject-locating methods (ROME/MEMIT) edit at the question's last
token. ``locality`` / ``K_R`` items are not tied to one edit: they become ``LoadedDataset.shared_locality``.

ConvSent (``{ent, pos, neg}``) is not an edit request -> :class:`~kedit.data.SentimentTopic`; see
:func:`~kedit.data.sentiment_requests`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kedit.requests import EditRequest, Probe

from ._common import FieldError, answers, build_request, get, leftovers, mapping, probe, strings
from .counterfact import PLACEHOLDER_TARGETS, easyedit_portability, sectioned_probes
from .records import SentimentTopic

__all__ = ["convert_convsent", "convert_knowedit", "convert_sanitation_item", "sanitation_locality"]

_KEYS = {
    "case_id",
    "subject",
    "concept",
    "prompt",
    "text",
    "target_new",
    "labels",
    "ground_truth",
    "rephrase_prompt",
    "locality",
    "portability",
}


def _alt(record: Mapping[str, Any], key: str, fallback: str) -> str:
    return key if key in record or fallback not in record else fallback


def convert_knowedit(record: Mapping[str, Any], index: int) -> list[EditRequest]:
    subject_key = _alt(record, "subject", "concept")
    prompt_key = _alt(record, "prompt", "text")
    target_key = _alt(record, "target_new", "labels")
    subject = get(record, subject_key)
    prompt = get(record, prompt_key)
    target_new = get(record, target_key)
    truth = [a for a in answers(record.get("ground_truth"), "ground_truth") if a not in PLACEHOLDER_TARGETS]
    paraphrases = strings(record.get("rephrase_prompt"), "rephrase_prompt")

    neighborhood: list[Probe] = []
    loc_answers: list[list[str]] = []
    if record.get("locality") is not None:
        neighborhood, loc_answers = sectioned_probes(mapping(record["locality"], "locality"), "locality")
    portability, port_answers, port_extra = easyedit_portability(record.get("portability"), "portability")

    extra = leftovers(record, _KEYS)
    extra.update(port_extra)
    if len(truth) > 1:
        extra["target_true_aliases"] = truth[1:]
    if any(len(a) > 1 for a in loc_answers):
        extra["neighborhood_answers"] = loc_answers
    if any(len(a) > 1 for a in port_answers):
        extra["portability_answers"] = port_answers
    return [
        build_request(
            {
                "prompt": prompt_key,
                "subject": subject_key,
                "target_new": target_key,
                "target_true": "ground_truth",
                "paraphrases": "rephrase_prompt",
            },
            prompt=prompt,
            subject=subject,
            target_new=target_new,
            target_true=truth[0] if truth else None,
            paraphrases=paraphrases,
            neighborhood=neighborhood,
            portability=portability,
            case_id=record.get("case_id", index),
            extra=extra,
        )
    ]


def convert_sanitation_item(record: Mapping[str, Any], index: int) -> list[EditRequest]:
    question = get(record, "question")
    target_new = get(record, "target_new")
    truth = answers(record.get("ground_truth"), "ground_truth")
    extra = leftovers(record, {"question", "target_new", "ground_truth", "subject", "case_id"})
    if len(truth) > 1:
        extra["target_true_aliases"] = truth[1:]
    if record.get("subject") is not None:
        prompt, subject = question, get(record, "subject")
    else:
        if "{}" in question:
            raise FieldError("question", "contains a literal '{}', which would be read as the subject slot")
        prompt, subject = "{}", question
        extra["subject_is_question"] = True
    return [
        build_request(
            {"prompt": "question", "target_true": "ground_truth"},
            prompt=prompt,
            subject=subject,
            target_new=target_new,
            target_true=truth[0] if truth else None,
            case_id=record.get("case_id", index),
            extra=extra,
        )
    ]


def sanitation_locality(record: Mapping[str, Any], index: int) -> list[Probe]:
    question = get(record, "question")
    return [probe(question, answers(record.get("ground_truth"), "ground_truth"), "locality", "question")]


def convert_convsent(record: Mapping[str, Any], index: int) -> list[SentimentTopic]:
    topic = get(record, "ent")
    pos = tuple(s.strip() for s in strings(get(record, "pos", types=list), "pos"))
    neg = tuple(s.strip() for s in strings(get(record, "neg", types=list), "neg"))
    case_id = record.get("case_id", index)
    return [SentimentTopic(topic=topic, positive=pos, negative=neg, case_id=str(case_id))]
