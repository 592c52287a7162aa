"""Typed records returned by :func:`kedit.data.load_dataset` besides plain :class:`~kedit.requests.EditRequest`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from kedit.requests import EditRequest, Probe

from .errors import RecordProblem, UnsupportedForEditingError

__all__ = ["LoadedDataset", "MQuAKECase", "MQuAKEHop", "Record", "SentimentTopic", "sentiment_requests"]


@dataclass(frozen=True)
class MQuAKEHop:
    """One hop of an MQuAKE chain (``single_hops`` / ``new_single_hops`` entries)."""

    question: str
    cloze: str
    answer: str
    aliases: tuple[str, ...] = ()

    @property
    def answers(self) -> tuple[str, ...]:
        """The answer followed by its aliases (every string an exact-match metric should accept)."""
        return (self.answer, *self.aliases)


@dataclass(frozen=True)
class MQuAKECase:
    """One MQuAKE case: edits that must all be applied together, then multi-hop questions about the result.

    Attributes:
        case_id: the dataset's ``case_id``.
        edits: one :class:`EditRequest` per ``requested_rewrite`` entry, in order. Their ``case_id`` is
            ``"<case_id>#<i>"``; ``extra`` holds ``relation_id``, ``question`` (the hop question), the Wikidata
            ids and ``target_aliases`` (aliases of the new object, from the matching ``new_single_hops`` entry).
        questions: the multi-hop questions (usually 3 paraphrases of one question).
        answer / answer_aliases: the pre-edit answer to the questions.
        new_answer / new_answer_aliases: the answer after all edits.
        single_hops / new_single_hops: the hop chain before / after the edits.
        extra: every other key of the record (e.g. ``orig`` with the triples).
    """

    case_id: str
    edits: tuple[EditRequest, ...]
    questions: tuple[str, ...]
    answer: str
    new_answer: str
    answer_aliases: tuple[str, ...] = ()
    new_answer_aliases: tuple[str, ...] = ()
    single_hops: tuple[MQuAKEHop, ...] = ()
    new_single_hops: tuple[MQuAKEHop, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def new_answers(self) -> tuple[str, ...]:
        return (self.new_answer, *self.new_answer_aliases)

    @property
    def answers(self) -> tuple[str, ...]:
        return (self.answer, *self.answer_aliases)

    def multi_hop_probes(self, *, edited: bool = True) -> tuple[Probe, ...]:
        """The multi-hop questions as probes expecting the post-edit (``edited=True``) or pre-edit answer.

        Aliases are not carried by :class:`Probe`; use :attr:`new_answers` / :attr:`answers` for exact match.
        """
        answer = self.new_answer if edited else self.answer
        return tuple(Probe(q, answer, "multi_hop") for q in self.questions)


@dataclass(frozen=True)
class SentimentTopic:
    """A KnowEdit ConvSent record: a topic with example positive and negative replies.

    This is *not* an edit request: the record names neither the prompt nor which sentiment to install (the
    reference EasyEdit script picks one at random per run). Build requests explicitly with
    :func:`sentiment_requests`.
    """

    topic: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    case_id: str | None = None


DEFAULT_SENTIMENT_TEMPLATE = "What do you think of {}?"


def sentiment_requests(
    topics: list[SentimentTopic] | tuple[SentimentTopic, ...],
    sentiment: str,
    *,
    template: str = DEFAULT_SENTIMENT_TEMPLATE,
) -> list[EditRequest]:
    """Turn ConvSent topics into edit requests towards ``sentiment`` (``"positive"`` or ``"negative"``).

    The prompt is ``template`` (one ``"{}"`` for the topic), the target the first example reply of that
    sentiment; all replies of that sentiment are kept in ``extra["target_responses"]`` and the opposite ones
    in ``extra["opposite_responses"]``.
    """
    if sentiment not in ("positive", "negative"):
        raise ValueError(f"sentiment must be 'positive' or 'negative', got {sentiment!r}")
    out = []
    for topic in topics:
        wanted = topic.positive if sentiment == "positive" else topic.negative
        other = topic.negative if sentiment == "positive" else topic.positive
        if not wanted:
            raise ValueError(f"ConvSent topic {topic.topic!r} has no {sentiment} reply to use as target")
        out.append(
            EditRequest(
                prompt=template,
                subject=topic.topic,
                target_new=wanted[0],
                case_id=topic.case_id,
                extra={
                    "sentiment": sentiment,
                    "target_responses": list(wanted),
                    "opposite_responses": list(other),
                },
            )
        )
    return out


Record = Union[EditRequest, MQuAKECase, SentimentTopic]  # noqa: UP007 (runtime alias, Python 3.10 target)


@dataclass(frozen=True)
class LoadedDataset:
    """What :func:`kedit.data.load_dataset` returns.

    Attributes:
        path: the file read (or the ``source`` label for in-memory data).
        format: the format name (see :data:`kedit.data.FORMATS`).
        records: the typed records, in file order: :class:`EditRequest` for plain edit formats,
            :class:`MQuAKECase` for MQuAKE, :class:`SentimentTopic` for ConvSent.
        problems: records skipped in ``errors="collect"`` mode (empty in strict mode).
        shared_locality: locality probes that belong to the whole file rather than one record (KnowEdit
            Sanitation's ``locality`` list, Sanitation-train ``K_R``).
        n_source_records: how many source records were read (after ``limit``), good or bad.
    """

    path: str
    format: str
    records: tuple[Record, ...]
    problems: tuple[RecordProblem, ...] = ()
    shared_locality: tuple[Probe, ...] = ()
    n_source_records: int = 0

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __getitem__(self, i: int) -> Record:
        return self.records[i]

    def requests(self) -> list[EditRequest]:
        """All edit requests, MQuAKE cases flattened to their edits in order.

        Raises:
            UnsupportedForEditingError: for ConvSent (topics are not edit requests; see
                :func:`sentiment_requests`).
        """
        out: list[EditRequest] = []
        for rec in self.records:
            if isinstance(rec, EditRequest):
                out.append(rec)
            elif isinstance(rec, MQuAKECase):
                out.extend(rec.edits)
            else:
                raise UnsupportedForEditingError(
                    self.path,
                    f"format {self.format!r} holds {type(rec).__name__} records, which are not edit requests; "
                    "for ConvSent build requests explicitly with kedit.data.sentiment_requests(topics, "
                    "'positive' | 'negative')",
                )
        return out
