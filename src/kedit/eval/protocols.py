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
``lifelong/v1``            a stream of T edits (re-edits of earlier facts included) applied in order in chunks of
                           k, each computed on the model with all earlier edits live; at each checkpoint t every
                           fact edited so far is evaluated (retention), plus a fixed locality probe set, perplexity,
                           time and memory (:mod:`kedit.eval.lifelong`). A chunk never spans a checkpoint.
``unlearn/v1``             the whole forget set is unlearned at once (one delta), then the forget, retain, other
                           entity, world-fact and holdout sets are measured against a retain model: forget quality
                           (KS test of truth ratios), model utility, membership-inference AUCs, recall of every
                           untouched fact (:mod:`kedit.unlearn.evaluate`); the model is restored after
=========================  =========================================================================================

The model is always restored (bitwise, LIFO revert of the applied deltas) at the end of a run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["PROTOCOLS", "Protocol", "Step", "check_checkpoints", "get_protocol", "list_protocols"]


@dataclass(frozen=True)
class Step:
    """One step of a plan: apply the edits of ``edit`` (record indices, one ``compute`` call), then evaluate the
    records ``evaluate``; with ``restore``, revert every applied edit afterwards."""

    index: int
    edit: tuple[int, ...]
    evaluate: tuple[int, ...]
    restore: bool
    #: lifelong: the number of edits applied after this step when it ends at a checkpoint, else ``None``
    checkpoint: int | None = None


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

    def plan(self, n: int, k: int = 1, checkpoints: Sequence[int] | None = None) -> list[Step]:
        """The steps for ``n`` records edited ``k`` at a time (``k`` is ignored by ``single``).

        ``lifelong``: ``n`` is the stream length T and ``checkpoints`` the (increasing) numbers of edits after which
        to evaluate (the last one must be T); the stream is cut at every checkpoint, then each segment into chunks
        of ``k``, so a checkpoint always falls between two compute calls. A checkpoint step's ``evaluate`` is every
        stream position so far (the runner evaluates each fact once, by its newest edit)."""
        if n < 1:
            raise ValueError("nothing to evaluate: no records")
        if k < 1:
            raise ValueError("batch size k must be ≥ 1")
        if self.name == "lifelong":
            cps = check_checkpoints(checkpoints if checkpoints is not None else [n], n)
            if cps[-1] != n:
                raise ValueError(f"the last checkpoint ({cps[-1]}) must be the stream length T = {n}")
            steps: list[Step] = []
            start = 0
            for cp in cps:
                for b in range(start, cp, k):
                    end = min(b + k, cp)
                    at = cp if end == cp else None
                    steps.append(Step(len(steps), tuple(range(b, end)), tuple(range(cp)) if at else (), False, at))
                start = cp
            steps[-1] = Step(steps[-1].index, steps[-1].edit, steps[-1].evaluate, True, steps[-1].checkpoint)
            return steps
        if self.name == "unlearn":  # one unlearning delta for the whole forget set
            return [Step(0, tuple(range(n)), tuple(range(n)), True)]
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
        Protocol("lifelong", 1, "a stream of T edits (about reedit_rate of them re-edit an earlier fact to a new "
                 "target) applied in order in chunks of k, each computed on the model with all earlier edits live; at "
                 "each checkpoint every fact edited so far is evaluated by its newest edit (retention), with "
                 "locality on a fixed set of facts no edit of the stream touches, perplexity on held-out text, time "
                 "per edit and memory held", cumulative=True),
        Protocol("unlearn", 1, "the whole forget set unlearned at once (one delta); forget, retain, other-entity, "
                 "world-fact and holdout sets measured against a retain model trained without the forget set: "
                 "forget quality (KS p-value of truth ratios), model utility (TOFU harmonic mean), MIA AUCs, recall "
                 "of every untouched fact; the model restored bitwise after", cumulative=False),
    )
}


def check_checkpoints(checkpoints: Sequence[int], n: int | None = None) -> tuple[int, ...]:
    """``checkpoints`` as a tuple, refused unless non-empty, positive, strictly increasing (and ``≤ n`` if given)."""
    cps = tuple(int(c) for c in checkpoints)
    if not cps:
        raise ValueError("checkpoints: give at least one")
    if any(c < 1 for c in cps):
        raise ValueError(f"checkpoints must be positive numbers of edits, got {list(cps)}")
    if any(b <= a for a, b in zip(cps, cps[1:])):
        raise ValueError(f"checkpoints must be strictly increasing, got {list(cps)}")
    if n is not None and cps[-1] > n:
        raise ValueError(f"checkpoint {cps[-1]} is more edits than the stream can have ({n} records)")
    return cps


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
