"""Choosing which requests may be edited *together*.

Batched locate-then-edit methods (MEMIT, PMET, AlphaEdit, EMMET, BLUE) key every edit on its subject's last token.
Two requests about the same subject (different relations) share that key but get independently optimised target
values, so a batch holding both asks one key for two values and at least one edit is lost. The MEMIT paper's
mass-editing experiments therefore use requests with distinct subjects (Meng et al., ICLR 2023, §5.2). Datasets and
the testbed list several relations per subject -- the testbed's 1,564 requests have 316 subjects -- so a
contiguous slice of 200 testbed requests holds ~100 such conflicts. :func:`distinct_subjects` selects a
conflict-free subset; :func:`subject_conflicts` counts what a batch holds (the evaluation runner records it).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Sequence

from kedit.requests import EditRequest

__all__ = [
    "distinct_per_batch",
    "distinct_subjects",
    "mentions_any",
    "subject_conflicts",
    "subject_key",
    "whole_subjects",
]

log = logging.getLogger(__name__)


def subject_key(subject: str) -> str:
    """How subjects are compared: NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", subject).casefold().split())


def distinct_subjects(requests: Sequence[EditRequest], limit: int | None = None) -> list[EditRequest]:
    """The first request of each subject, in input order (at most ``limit`` of them).

    Logs how many requests were dropped; raises ``ValueError`` if ``limit`` asks for more distinct subjects
    than the requests have, so a caller never evaluates a smaller batch than it asked for without noticing.
    """
    seen: set[str] = set()
    out: list[EditRequest] = []
    for req in requests:
        key = subject_key(req.subject)
        if key in seen:
            continue
        seen.add(key)
        out.append(req)
        if limit is not None and len(out) == limit:
            break
    if limit is not None and len(out) < limit:
        raise ValueError(
            f"asked for {limit} requests with distinct subjects, but the {len(requests)} requests have only "
            f"{len(out)} distinct subjects"
        )
    dropped = len(requests) - len(out) if limit is None else None
    if dropped:
        log.info("distinct subjects: kept %d of %d requests (%d shared a subject)", len(out), len(requests), dropped)
    return out


def whole_subjects(requests: Sequence[EditRequest], limit: int | None = None) -> list[EditRequest]:
    """Every request of as few subjects as give ``limit`` requests, interleaved across the subjects.

    For long edit streams that must leave part of the data *untouched* (``lifelong/v1`` measures locality on facts
    whose subject no edit names): subjects are taken in order of first appearance, each with all of its requests,
    until ``limit`` requests are reached, so every subject beyond them stays unedited. The kept requests are then
    ordered round-robin over the kept subjects (every subject's first request, then every subject's second, ...;
    within a subject, input order), so two requests about one subject are as far apart as the subject count allows
    (which keeps batches of ``k`` conflict-free while ``k`` is at most the number of kept subjects). With
    ``limit``, the round-robin list is cut to ``limit`` requests (the last round's tail is dropped; every kept
    subject still has its first request in). Raises ``ValueError`` if the requests are fewer than ``limit``.
    """
    every: dict[str, list[EditRequest]] = {}
    for req in requests:
        every.setdefault(subject_key(req.subject), []).append(req)
    groups: dict[str, list[EditRequest]] = {}
    total = 0
    for key, reqs in every.items():
        if limit is not None and total >= limit:
            break
        groups[key] = reqs
        total += len(reqs)
    if limit is not None and total < limit:
        raise ValueError(f"asked for {limit} requests of whole subjects, but there are only {total} requests")
    out: list[EditRequest] = []
    rnd = 0
    while len(out) < total:
        for reqs in groups.values():
            if rnd < len(reqs):
                out.append(reqs[rnd])
        rnd += 1
    if limit is not None:
        out = out[:limit]
    log.info("whole subjects: %d requests of %d subjects (%d of the %d requests given left untouched)", len(out),
             len(groups), len(requests) - total, len(requests))
    return out


def distinct_per_batch(requests: Sequence[EditRequest], k: int) -> list[EditRequest]:
    """All of ``requests``, reordered so that each consecutive chunk of ``k`` has distinct subjects where possible.

    For sequential editing in batches of ``k`` (every request is kept, unlike :func:`distinct_subjects`): each
    chunk takes, in input order, the earliest remaining requests whose subject is not yet in the chunk. A chunk can
    only repeat a subject when every remaining request's subject is already in it (a subject with more requests
    than there are chunks); :func:`subject_conflicts` per chunk says how many such conflicts remain.
    """
    if k < 1:
        raise ValueError("batch size k must be ≥ 1")
    remaining = list(requests)
    out: list[EditRequest] = []
    while remaining:
        chunk_keys: set[str] = set()
        rest: list[EditRequest] = []
        taken = 0
        for req in remaining:
            key = subject_key(req.subject)
            if taken < k and key not in chunk_keys:
                chunk_keys.add(key)
                out.append(req)
                taken += 1
            else:
                rest.append(req)
        # chunks stay exactly k long (the protocol cuts the list every k): a chunk short of distinct subjects is
        # filled with the earliest conflicting requests
        while taken < k and rest:
            out.append(rest.pop(0))
            taken += 1
        remaining = rest
    return out


def subject_conflicts(requests: Sequence[EditRequest]) -> int:
    """Number of requests whose subject already occurs earlier in ``requests`` (0 = conflict-free batch)."""
    keys = [subject_key(r.subject) for r in requests]
    return len(keys) - len(set(keys))


def mentions_any(text: str, subject_keys: set[str] | frozenset[str]) -> bool:
    """Whether ``text`` names one of ``subject_keys`` (:func:`subject_key` forms) as a whole word sequence."""
    keys = sorted((k for k in subject_keys if k), key=len, reverse=True)
    if not keys:
        return False
    # one alternation search per text (not one per subject); `re` keeps the compiled pattern for repeated sets
    pattern = r"(?<!\w)(?:" + "|".join(map(re.escape, keys)) + r")(?!\w)"
    return re.search(pattern, subject_key(text)) is not None
