"""CounterFact converters: the ROME/MEMIT ``requested_rewrite`` shape and EasyEdit's flat shape.

ROME shape (``counterfact.json``, ``multi_counterfact.json``, EasyEdit's portability / distracting-neighbour /
subject-replace variants) -> one :class:`EditRequest` per rewrite:

==============================================  ==============================================================
dataset field                                   EditRequest
==============================================  ==============================================================
``requested_rewrite.prompt`` (has ``{}``)       ``prompt``
``requested_rewrite.subject``                   ``subject``
``requested_rewrite.target_new.str``            ``target_new`` (``.id`` -> ``extra["target_new_id"]``)
``requested_rewrite.target_true.str``           ``target_true`` (``.id`` -> ``extra["target_true_id"]``)
``requested_rewrite.relation_id``               ``extra["relation_id"]``
``paraphrase_prompts``                          ``paraphrases``
``neighborhood_prompts``                        ``neighborhood`` (kind ``"neighborhood"``, answer = target_true)
``distracting_neighborhood_prompts``            ``neighborhood`` (kind ``"distracting_neighborhood"``,
                                                answer = target_true)
``unrelated_relation{question, object}``        ``neighborhood`` (kind ``"unrelated_relation"``)
``portability{New Question, New Answer}``       ``portability`` (kind ``"one_hop"``; ``Recalled Relation`` ->
                                                ``extra["recalled_relation"]``)
``alternative_subject``                         ``aliases``
``attribute_prompts``                           ``extra["attribute_prompts"]`` (prompts about other subjects
                                                whose true answer is target_new)
``generation_prompts``                          ``extra["generation_prompts"]``
``case_id``                                     ``case_id``
anything else (``pararel_idx``...)              ``extra[key]``
==============================================  ==============================================================

When ``requested_rewrite`` is a list with several rewrites, each becomes a request with case_id
``"<case_id>#<i>"``; a record-level paraphrase / generation prompt is given to a rewrite only if it contains that
rewrite's subject, and neighbourhood probes get no answer (``None``: compare with the pre-edit model), since
the record does not say which rewrite's true object they share; ``alternative_subject`` and ``portability``
stay raw in ``extra``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kedit.requests import EditRequest, Probe

from ._common import FieldError, answers, build_request, get, leftovers, mapping, probe, strings

__all__ = ["convert_counterfact", "convert_easyedit", "easyedit_portability"]

PLACEHOLDER_TARGETS = frozenset({"<|endoftext|>"})

_CF_KEYS = {
    "case_id",
    "requested_rewrite",
    "paraphrase_prompts",
    "neighborhood_prompts",
    "distracting_neighborhood_prompts",
    "unrelated_relation",
    "portability",
    "alternative_subject",
    "attribute_prompts",
    "generation_prompts",
}
_RW_KEYS = {"prompt", "subject", "target_new", "target_true", "relation_id"}


def _target(rw: Mapping[str, Any], key: str, where: str, *, required: bool) -> tuple[str | None, Any]:
    """``{"str": ..., "id": ...}`` or a bare string -> (text, id)."""
    name = f"{where}.{key}"
    value = rw.get(key)
    if value is None:
        if required:
            raise FieldError(name, "missing required field")
        return None, None
    if isinstance(value, str):
        text, ident = value, None
    elif isinstance(value, Mapping):
        text = get(value, "str", where=name, types=str)
        ident = value.get("id")
    else:
        raise FieldError(name, f"expected an object with 'str' or a string, got {type(value).__name__}")
    if not text.strip():
        if not required:  # an empty optional target (exports write "" for "unknown") means unknown
            return None, ident
        raise FieldError(f"{name}.str" if isinstance(value, Mapping) else name, "must be a non-empty string")
    if text.strip() in PLACEHOLDER_TARGETS:
        if required:
            raise FieldError(name, f"placeholder {text!r} is not a usable target")
        return None, ident
    return text, ident


def easyedit_portability(value: Any, name: str) -> tuple[list[Probe], list[list[str]], dict[str, Any]]:
    """EasyEdit ``portability``: either ``{Recalled Relation, New Question, New Answer}`` (one-hop files) or
    KnowEdit's ``{section: [{prompt, ground_truth}, ...]}``. Returns (probes, answers per probe, extra)."""
    if value is None:
        return [], [], {}
    value = mapping(value, name)
    if "New Question" in value:
        question = get(value, "New Question", where=name)
        ans = answers(get(value, "New Answer", where=name, types=(str, list)), f"{name}.New Answer")
        extra = {}
        if "Recalled Relation" in value:
            extra["recalled_relation"] = value["Recalled Relation"]
        return [probe(question, ans, "one_hop", f"{name}.New Question")], [ans], extra
    return (*sectioned_probes(value, name), {})


def sectioned_probes(value: Mapping[str, Any], name: str) -> tuple[list[Probe], list[list[str]]]:
    """KnowEdit ``{section: [{prompt, ground_truth}, ...]}`` -> probes (kind = section name) and answer lists."""
    probes: list[Probe] = []
    all_answers: list[list[str]] = []
    for section, items in value.items():
        where = f"{name}.{section}"
        if not isinstance(items, list):
            raise FieldError(
                where, f"expected a list of {{prompt, ground_truth}} objects, got {type(items).__name__}"
            )
        for i, item in enumerate(items):
            item_name = f"{where}[{i}]"
            item = mapping(item, item_name)
            prompts = strings(
                get(item, "prompt", where=item_name, types=(str, list)),
                f"{item_name}.prompt",
                allow_empty_list=False,
            )
            ans = answers(item.get("ground_truth"), f"{item_name}.ground_truth")
            for p in prompts:
                probes.append(probe(p, ans, section, f"{item_name}.prompt"))
                all_answers.append(ans)
    return probes, all_answers


def convert_counterfact(record: Mapping[str, Any], index: int) -> list[EditRequest]:
    raw = record.get("requested_rewrite")
    if isinstance(raw, Mapping):
        rewrites: list[tuple[str, Mapping[str, Any]]] = [("requested_rewrite", raw)]
    elif isinstance(raw, list) and raw:
        rewrites = [
            (f"requested_rewrite[{j}]", mapping(r, f"requested_rewrite[{j}]")) for j, r in enumerate(raw)
        ]
    else:
        raise FieldError(
            "requested_rewrite",
            "expected an object or a non-empty list of objects, got "
            f"{type(raw).__name__ if raw is not None else 'nothing'}",
        )
    many = len(rewrites) > 1
    case_id = record.get("case_id", index)

    paraphrases = strings(record.get("paraphrase_prompts"), "paraphrase_prompts")
    neighbours = strings(record.get("neighborhood_prompts"), "neighborhood_prompts")
    distracting = strings(record.get("distracting_neighborhood_prompts"), "distracting_neighborhood_prompts")
    attribute = strings(record.get("attribute_prompts"), "attribute_prompts")
    generation = strings(record.get("generation_prompts"), "generation_prompts")
    aliases = strings(record.get("alternative_subject"), "alternative_subject")
    port_probes, port_answers, port_extra = easyedit_portability(record.get("portability"), "portability")
    unrelated: list[tuple[str, list[str]]] = []
    if record.get("unrelated_relation") is not None:
        ur = mapping(record["unrelated_relation"], "unrelated_relation")
        unrelated.append(
            (
                get(ur, "question", where="unrelated_relation"),
                answers(
                    get(ur, "object", where="unrelated_relation", types=(str, list)),
                    "unrelated_relation.object",
                ),
            )
        )
    rest = leftovers(record, _CF_KEYS)
    if many and record.get("portability") is not None:
        # which rewrite a record-level portability question follows from is not recorded: keep it raw
        rest["portability"] = record["portability"]
        port_probes, port_answers, port_extra = [], [], {}
    if many and aliases:
        rest["alternative_subject"] = record["alternative_subject"]
        aliases = []

    out = []
    for j, (where, rw) in enumerate(rewrites):
        prompt = get(rw, "prompt", where=where)
        subject = get(rw, "subject", where=where)
        target_new, new_id = _target(rw, "target_new", where, required=True)
        target_true, true_id = _target(rw, "target_true", where, required=False)
        mine = (lambda ps, s=subject: [p for p in ps if s in p]) if many else (lambda ps: list(ps))
        neighbour_answer = [] if many or target_true is None else [target_true]
        neighborhood = [
            probe(p, neighbour_answer, "neighborhood", "neighborhood_prompts") for p in neighbours
        ]
        neighborhood += [
            probe(p, neighbour_answer, "distracting_neighborhood", "distracting_neighborhood_prompts")
            for p in distracting
        ]
        neighborhood += [
            probe(q, a, "unrelated_relation", "unrelated_relation.question") for q, a in unrelated
        ]
        extra: dict[str, Any] = dict(rest)
        if "relation_id" in rw:
            extra["relation_id"] = rw["relation_id"]
        if new_id is not None:
            extra["target_new_id"] = new_id
        if true_id is not None:
            extra["target_true_id"] = true_id
        extra.update(leftovers(rw, _RW_KEYS))
        if attribute:
            extra["attribute_prompts"] = attribute
        gen = mine(generation)
        if gen:
            extra["generation_prompts"] = gen
        extra.update(port_extra)
        if any(len(a) > 1 for a in port_answers):
            extra["portability_answers"] = port_answers
        if many:
            extra["rewrite_index"] = j
        out.append(
            build_request(
                {
                    "prompt": f"{where}.prompt",
                    "subject": f"{where}.subject",
                    "target_new": f"{where}.target_new",
                    "target_true": f"{where}.target_true",
                    "paraphrases": "paraphrase_prompts",
                    "aliases": "alternative_subject",
                },
                prompt=prompt,
                subject=subject,
                target_new=target_new,
                target_true=target_true,
                paraphrases=mine(paraphrases),
                neighborhood=neighborhood,
                portability=port_probes,
                aliases=aliases,
                case_id=f"{case_id}#{j}" if many else case_id,
                extra=extra,
            )
        )
    return out


_FLAT_KEYS = {
    "case_id",
    "prompt",
    "subject",
    "target_new",
    "ground_truth",
    "rephrase_prompt",
    "rephrase_prompts",
    "locality_prompt",
    "locality_ground_truth",
    "portability_prompt",
    "portability_ground_truth",
}


def _paired(
    record: Mapping[str, Any], prompt_key: str, answer_key: str, kind: str
) -> tuple[list[Probe], list[list[str]]]:
    prompts_raw = record.get(prompt_key)
    if prompts_raw is None:
        return [], []
    prompts = strings(prompts_raw, prompt_key)
    raw_answers = record.get(answer_key)
    if isinstance(prompts_raw, list):
        if not isinstance(raw_answers, list) or len(raw_answers) != len(prompts_raw):
            raise FieldError(
                answer_key, f"expected a list of {len(prompts_raw)} answers parallel to {prompt_key}"
            )
        per = [answers(a, f"{answer_key}[{i}]") for i, a in enumerate(raw_answers)]
        per = [a for p, a in zip(prompts_raw, per) if isinstance(p, str) and p.strip()]
    else:
        per = [answers(raw_answers, answer_key)]
    return [probe(p, a, kind, prompt_key) for p, a in zip(prompts, per)], per


def convert_easyedit(record: Mapping[str, Any], index: int) -> list[EditRequest]:
    """EasyEdit flat shape: ``prompt/subject/target_new/ground_truth/rephrase_prompt/locality_prompt/
    locality_ground_truth`` (+ optional ``portability_prompt/portability_ground_truth``)."""
    prompt = get(record, "prompt")
    subject = get(record, "subject")
    target_new = get(record, "target_new")
    truth = [a for a in answers(record.get("ground_truth"), "ground_truth") if a not in PLACEHOLDER_TARGETS]
    rephrase = strings(record.get("rephrase_prompt"), "rephrase_prompt") + strings(
        record.get("rephrase_prompts"), "rephrase_prompts"
    )
    neighborhood, loc_answers = _paired(record, "locality_prompt", "locality_ground_truth", "neighborhood")
    portability, port_answers = _paired(
        record, "portability_prompt", "portability_ground_truth", "portability"
    )
    extra = leftovers(record, _FLAT_KEYS)
    if len(truth) > 1:
        extra["target_true_aliases"] = truth[1:]
    if any(len(a) > 1 for a in loc_answers):
        extra["neighborhood_answers"] = loc_answers
    if any(len(a) > 1 for a in port_answers):
        extra["portability_answers"] = port_answers
    return [
        build_request(
            {"paraphrases": "rephrase_prompt", "target_true": "ground_truth"},
            prompt=prompt,
            subject=subject,
            target_new=target_new,
            target_true=truth[0] if truth else None,
            paraphrases=rephrase,
            neighborhood=neighborhood,
            portability=portability,
            case_id=record.get("case_id", index),
            extra=extra,
        )
    ]
