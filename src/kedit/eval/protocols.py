"""Evaluation protocols: named, versioned plans of *which edits are applied when, and which records are evaluated
at which point*. Every result file records the protocol's ``name/version``; a change of semantics gets a new
version, never a silent change (the field's reference framework changed its sequential protocol in place).

=========================  =========================================================================================
``single/v1``              for each record: edit it alone, evaluate it, restore the model (bitwise) before the next
``batch/v1``               for each chunk of k records: edit the k at once (one ``compute`` call), evaluate the k,
                           restore the model
``sequential-final/v1``    apply the edits in order, in chunks of k (k=1: one edit at a time), each computed on the
                           model with every earlier edit applied; evaluate *all* records once, after the last edit
``sequential-immediate/v1``  as sequential-final, but evaluate each chunk's records right after their own edit (so
                           later edits cannot affect them); ``step``/``n_edits`` of each result say when
=========================  =========================================================================================

The model is always restored (bitwise, LIFO revert of the applied deltas) at the end of a run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["PROTOCOLS", "Protocol", "Step", "get_protocol", "list_protocols"]


@dataclass(frozen=True)
class Step:
    """One step of a plan: apply the edits of ``edit`` (record indices, one ``compute`` call), then evaluate the
    records ``evaluate``; with ``restore``, revert every applied edit afterwards."""

    index: int
    edit: tuple[int, ...]
    evaluate: tuple[int, ...]
    restore: bool


@dataclass(frozen=True)
class Protocol:
    """A named, versioned evaluation protocol."""

    name: str
    version: int
    description: str
    #: edits accumulate across steps (a resumed run must replay the earlier steps' edits)
    cumulative: bool

    @property
    def id(self) -> str:
        return f"{self.name}/v{self.version}"

    def plan(self, n: int, k: int = 1) -> list[Step]:
        """The steps for ``n`` records edited ``k`` at a time (``k`` is ignored by ``single``)."""
        if n < 1:
            raise ValueError("nothing to evaluate: no records")
        if k < 1:
            raise ValueError("batch size k must be ≥ 1")
        if self.name == "single":
            k = 1
        chunks = [tuple(range(b, min(b + k, n))) for b in range(0, n, k)]
        if not self.cumulative:
            return [Step(i, c, c, True) for i, c in enumerate(chunks)]
        last = len(chunks) - 1
        if self.name == "sequential-final":
            return [Step(i, c, tuple(range(n)) if i == last else (), i == last) for i, c in enumerate(chunks)]
        return [Step(i, c, c, i == last) for i, c in enumerate(chunks)]

    def describe(self) -> dict[str, object]:
        return {"id": self.id, "name": self.name, "version": self.version, "description": self.description}


PROTOCOLS: dict[str, Protocol] = {
    p.id: p
    for p in (
        Protocol("single", 1, "each record edited alone on the base model, evaluated, then the model is restored "
                 "bitwise before the next record", cumulative=False),
        Protocol("batch", 1, "records edited k at a time (one compute call per chunk) on the base model, the chunk "
                 "evaluated, then the model restored bitwise", cumulative=False),
        Protocol("sequential-final", 1, "edits applied in order in chunks of k, each computed on the model with all "
                 "earlier edits applied; every record evaluated once after the last edit", cumulative=True),
        Protocol("sequential-immediate", 1, "edits applied in order in chunks of k, each computed on the model with "
                 "all earlier edits applied; each chunk evaluated right after its own edit", cumulative=True),
    )
}


def get_protocol(name: str) -> Protocol:
    """Look up ``name/vN``; a bare ``name`` means its latest version."""
    if name in PROTOCOLS:
        return PROTOCOLS[name]
    versions = sorted((p for p in PROTOCOLS.values() if p.name == name), key=lambda p: p.version)
    if versions:
        return versions[-1]
    raise ValueError(f"unknown protocol {name!r}; known: {', '.join(sorted(PROTOCOLS))}")


def list_protocols() -> Sequence[Protocol]:
    return list(PROTOCOLS.values())
