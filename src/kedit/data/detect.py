"""Format detection from the shape of the records, and the table of known formats."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import DataFormatError
from .native import REQUEST_FIELDS

__all__ = ["FORMATS", "FormatInfo", "classify_record", "detect_format"]


@dataclass(frozen=True)
class FormatInfo:
    """One known format.

    Attributes:
        name: the value :func:`detect_format` returns and ``format=`` accepts.
        description: what the records are.
        record_type: the typed record ``load_dataset`` yields (``"EditRequest"``, ``"MQuAKECase"``,
            ``"SentimentTopic"``), or ``None`` when loading is unsupported.
        editable: whether :func:`~kedit.data.load_requests` can return edit requests for it.
    """

    name: str
    description: str
    record_type: str | None
    editable: bool


FORMATS: Mapping[str, FormatInfo] = {
    info.name: info
    for info in (
        FormatInfo(
            "counterfact",
            "CounterFact, ROME/MEMIT shape with 'requested_rewrite' (object or list; "
            "multi-counterfact and EasyEdit's portability / distracting-neighbour / subject-replace "
            "variants)",
            "EditRequest",
            True,
        ),
        FormatInfo(
            "easyedit",
            "EasyEdit flat records (prompt/subject/target_new/ground_truth/rephrase_prompt/"
            "locality_prompt/locality_ground_truth), e.g. counterfact-train/val/edit.json",
            "EditRequest",
            True,
        ),
        FormatInfo(
            "zsre",
            "zsRE, MEND/ROME shape (src/alt/answers/rephrase/loc/loc_ans/subject) and EasyEdit's "
            "portability / inverse-relation / subject-replace variants",
            "EditRequest",
            True,
        ),
        FormatInfo(
            "knowedit",
            "KnowEdit ZsRE-test-all, wiki_counterfact, wiki_recent and WikiBio "
            "(locality/portability dicts of section -> [{prompt, ground_truth}])",
            "EditRequest",
            True,
        ),
        FormatInfo(
            "knowedit_sanitation",
            "KnowEdit Sanitation ({'success': [...], 'locality': [...]} test split, "
            "or {'K_F': [...], 'K_R': [...]} train split)",
            "EditRequest",
            True,
        ),
        FormatInfo(
            "knowedit_convsent",
            "KnowEdit ConvSent (ent/pos/neg): topics with example positive and "
            "negative replies, not edit requests",
            "SentimentTopic",
            False,
        ),
        FormatInfo(
            "mquake",
            "MQuAKE (MQuAKE-CF/-T/-hard): several edits per case plus multi-hop questions",
            "MQuAKECase",
            True,
        ),
        FormatInfo("kedit", "kedit's own format: EditRequest.to_dict() objects", "EditRequest", True),
        FormatInfo(
            "tofu",
            "TOFU, an unlearning benchmark (question/answer pairs about fictitious authors to "
            "forget or retain); not edit requests",
            None,
            False,
        ),
        FormatInfo(
            "knowundo",
            "KnowUnDo, an unlearning benchmark (text/labels question-answer pairs to unlearn "
            "or retain); not edit requests",
            None,
            False,
        ),
        FormatInfo(
            "keti",
            "KETI, edit-intention classification (query/object/type: which edits are harmful); "
            "data for detecting malicious edits, not edit requests",
            None,
            False,
        ),
        FormatInfo(
            "oneedit",
            "OneEdit relationship library / knowledge-graph triples (no prompts); not edit requests",
            None,
            False,
        ),
    )
}

_MQUAKE_KEYS = ("questions", "new_answer", "single_hops", "new_single_hops")
_TOFU_KEYS = frozenset(
    {
        "question",
        "answer",
        "paraphrased_answer",
        "perturbed_answer",
        "paraphrased_question",
        "option1",
        "option2",
        "option3",
        "option4",
        "task_id",
    }
)


def classify_record(record: Any) -> str | None:
    """The format one record looks like, or ``None`` if it matches none."""
    if not isinstance(record, Mapping):
        return None
    keys = set(record)
    if "requested_rewrite" in keys:
        return "mquake" if any(k in keys for k in _MQUAKE_KEYS) else "counterfact"
    if "src" in keys and ("alt" in keys or "answers" in keys):
        return "zsre"
    if {"ent", "pos", "neg"} <= keys:
        return "knowedit_convsent"
    if {"concept", "text", "labels"} <= keys:
        return "knowedit"
    if {"prompt", "subject", "target_new"} <= keys:
        if "locality" in keys or isinstance(record.get("portability"), Mapping):
            return "knowedit"
        if keys <= REQUEST_FIELDS:
            return "kedit"
        return "easyedit"
    if {"question", "target_new"} <= keys:
        return "knowedit_sanitation"
    if {"question", "answer"} <= keys <= _TOFU_KEYS:
        return "tofu"
    if keys == {"text", "labels"}:
        return "knowundo"
    if {"query", "object", "type"} <= keys:
        return "keti"
    if {"name", "type", "reverse", "multihop"} <= keys:
        return "oneedit"
    return None


def _container_format(data: Mapping[str, Any]) -> str | None:
    if ("success" in data and "locality" in data) or "K_F" in data:
        return "knowedit_sanitation"
    return None


def detect_format(
    records: Sequence[Any] | Mapping[str, Any], *, source: str = "<memory>", sample: int = 50
) -> str:
    """Name of the format of parsed records (a JSON array / JSON Lines list, or a top-level JSON object).

    Looks at the first ``sample`` records; the most common recognised shape wins (a file mixing minimal
    ``{prompt, subject, target_new}`` records with EasyEdit ones is ``"easyedit"``, whose loader reads both).

    Raises:
        DataFormatError: if no record has a known shape.
    """
    if isinstance(records, Mapping):
        found = _container_format(records)
        if found is None:
            raise DataFormatError(
                source,
                "top-level JSON object is not a known container (expected a JSON array "
                "of records, JSON Lines, or KnowEdit Sanitation's {'success', 'locality'}); keys: "
                f"{sorted(records)[:10]}",
            )
        return found
    if isinstance(records, (str, bytes)) or not isinstance(records, Sequence):
        raise DataFormatError(source, f"expected a list of records, got {type(records).__name__}")
    if not records:
        raise DataFormatError(source, "no records; cannot detect the format (pass format=...)")
    votes = Counter(f for f in (classify_record(r) for r in records[:sample]) if f is not None)
    if not votes:
        first = records[0]
        shape = sorted(first)[:12] if isinstance(first, Mapping) else type(first).__name__
        raise DataFormatError(
            source,
            f"cannot detect the format from the records (first record: {shape}); "
            f"pass format= one of {sorted(FORMATS)}",
        )
    if set(votes) == {"kedit", "easyedit"}:
        return "easyedit"
    return votes.most_common(1)[0][0]
