"""Errors raised by the dataset loaders, and the record kept for each problem in ``errors="collect"`` mode."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DataFormatError", "RecordProblem", "UnsupportedForEditingError"]


def _location(
    path: str, index: int | None, section: str | None, field: str | None, case_id: str | None = None
) -> str:
    """``<file>, case <case_id> (record <n>), field '<field>'`` -- ``n`` is 1-based (the third record is
    ``record 3``); ``case`` only when the record carries a ``case_id``."""
    parts = [path]
    if index is not None:
        where = f"record {index + 1}" + (f" of {section!r}" if section else "")
        parts.append(f"case {case_id} ({where})" if case_id is not None else where)
    elif section:
        parts.append(f"section {section!r}")
    if field:
        parts.append(f"field {field!r}")
    return ", ".join(parts)


class DataFormatError(ValueError):
    """A file, or one record in it, does not have the shape its format requires.

    Attributes:
        path: the file (or ``"<memory>"`` / the ``source`` given to :func:`~kedit.data.parse_records`).
        index: 0-based position of the bad record in the file (``None`` for file-level problems); messages show
            it 1-based (``record 3`` is ``index == 2``). For JSON Lines this is the record number, not the line
            number (blank lines are skipped).
        case_id: the record's own ``case_id`` when it has one (messages then name ``case <case_id>`` first).
        field: the offending field in the dataset's own naming, dotted for nested keys
            (``"requested_rewrite.target_new.str"``, ``"locality.Relation_Specificity[0].ground_truth"``).
        section: for files holding several record lists (KnowEdit Sanitation: ``"success"``), which list.
        reason: the bare explanation.
    """

    def __init__(
        self,
        path: str,
        reason: str,
        *,
        index: int | None = None,
        field: str | None = None,
        section: str | None = None,
        case_id: str | None = None,
    ) -> None:
        self.path = path
        self.index = index
        self.field = field
        self.section = section
        self.reason = reason
        self.case_id = case_id
        super().__init__(f"{_location(path, index, section, field, case_id)}: {reason}")


class UnsupportedForEditingError(DataFormatError):
    """The file is a known dataset, but its records are not edit requests (e.g. TOFU, KnowUnDo, KETI, ConvSent)."""


@dataclass(frozen=True)
class RecordProblem:
    """One record skipped in ``errors="collect"`` mode; ``str()`` gives the same text as the error would."""

    path: str
    index: int | None
    field: str | None
    reason: str
    section: str | None = None
    case_id: str | None = None

    def __str__(self) -> str:
        return f"{_location(self.path, self.index, self.section, self.field, self.case_id)}: {self.reason}"

    @classmethod
    def from_error(cls, err: DataFormatError) -> RecordProblem:
        return cls(err.path, err.index, err.field, err.reason, err.section, getattr(err, "case_id", None))

    def to_error(self) -> DataFormatError:
        return DataFormatError(
            self.path, self.reason, index=self.index, field=self.field, section=self.section, case_id=self.case_id
        )
