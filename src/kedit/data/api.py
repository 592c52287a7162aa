"""Reading files (JSON arrays or JSON Lines), dispatching to the converters, error policy."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

from kedit.requests import EditRequest, Probe, RequestError

from ._common import FieldError
from .counterfact import convert_counterfact, convert_easyedit
from .detect import FORMATS, classify_record, detect_format
from .errors import DataFormatError, RecordProblem, UnsupportedForEditingError
from .knowedit import convert_convsent, convert_knowedit, convert_sanitation_item, sanitation_locality
from .mquake import convert_mquake
from .native import convert_kedit
from .records import LoadedDataset
from .zsre import convert_zsre

__all__ = ["dump_requests", "load_dataset", "load_requests", "parse_records", "read_records"]

logger = logging.getLogger(__name__)

Errors = Literal["raise", "collect"]
PathLike = str | os.PathLike[str]

_CONVERTERS: Mapping[str, Callable[[Mapping[str, Any], int], list[Any]]] = {
    "counterfact": convert_counterfact,
    "easyedit": convert_easyedit,
    "zsre": convert_zsre,
    "knowedit": convert_knowedit,
    "knowedit_sanitation": convert_sanitation_item,
    "knowedit_convsent": convert_convsent,
    "mquake": convert_mquake,
    "kedit": convert_kedit,
}


@dataclass(frozen=True)
class _BadLine:
    """A JSON Lines line that did not parse; it becomes a record-level problem, not a file-level failure."""

    line: int
    reason: str


# -- reading ------------------------------------------------------------------------------------------------------
def _parse_jsonl(text: str, path: str, limit: int | None) -> list[Any]:
    out: list[Any] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if limit is not None and len(out) >= limit:
            break
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as err:
            out.append(_BadLine(lineno, f"invalid JSON on line {lineno}: {err.msg} (column {err.colno})"))
    return out


def read_records(path: PathLike, *, limit: int | None = None) -> list[Any] | dict[str, Any]:
    """Parse a JSON array, a top-level JSON object, or JSON Lines (detected from the content, whatever the
    file extension: some ``.json`` files in the wild are JSON Lines). ``limit`` truncates JSON Lines early.

    Unparseable JSON Lines lines are kept as placeholders so that the loaders can report them by record index.

    Raises:
        DataFormatError: the file is not JSON / JSON Lines, or is a CSV file.
    """
    name = str(path)
    p = Path(path)
    if p.suffix.lower() in (".csv", ".tsv"):
        raise UnsupportedForEditingError(
            name,
            "CSV files (e.g. OneEdit knowledge-graph triples head,relation,tail)"
            " are not edit-request datasets; only JSON and JSON Lines are read",
        )
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as err:
        raise DataFormatError(name, f"cannot read file: {err}") from err
    stripped = text.strip()
    if not stripped:
        raise DataFormatError(name, "file is empty")
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        return _parse_jsonl(text, name, limit)
    try:
        data = json.loads(stripped)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and stripped.startswith("{"):
            return _parse_jsonl(text, name, limit)
        raise DataFormatError(
            name, f"invalid JSON: {err.msg} at line {err.lineno}, column {err.colno}"
        ) from None
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        if classify_record(data) is not None and "success" not in data and "K_F" not in data:
            return [data]  # a JSON Lines file holding a single record
        return data
    raise DataFormatError(name, f"expected a JSON array or object, got {type(data).__name__}")


# -- converting -------------------------------------------------------------------------------------------------------
def _check_args(format: str | None, limit: int | None, errors: str) -> None:
    if errors not in ("raise", "collect"):
        raise ValueError(f"errors must be 'raise' or 'collect', got {errors!r}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; known: {sorted(FORMATS)}")


def _convert_all(
    items: Sequence[Any],
    convert: Callable[[Mapping[str, Any], int], list[Any]],
    *,
    path: str,
    section: str | None,
    errors: str,
    problems: list[RecordProblem],
    hint: Callable[[int], str] = lambda i: "",
) -> list[Any]:
    out: list[Any] = []
    for i, item in enumerate(items):
        cid = item.get("case_id") if isinstance(item, Mapping) else None
        cid = None if cid is None or isinstance(cid, (dict, list)) else str(cid)
        try:
            if isinstance(item, _BadLine):
                raise FieldError(None, item.reason)
            if not isinstance(item, Mapping):
                raise FieldError(None, f"expected a JSON object, got {type(item).__name__}")
            out.extend(convert(item, i))
        except FieldError as err:
            error = DataFormatError(path, err.reason + hint(i), index=i, field=err.field, section=section,
                                    case_id=cid)
        except RequestError as err:  # a converter let one through: still name the record
            error = DataFormatError(path, str(err) + hint(i), index=i, section=section, case_id=cid)
        except (TypeError, ValueError, KeyError, AttributeError) as err:
            error = DataFormatError(path, f"{type(err).__name__}: {err}" + hint(i), index=i, section=section,
                                    case_id=cid)
        else:
            continue
        if errors == "raise":
            raise error
        problems.append(RecordProblem.from_error(error))
    return out


def parse_records(
    data: Sequence[Any] | Mapping[str, Any],
    format: str | None = None,
    *,
    source: str = "<memory>",
    limit: int | None = None,
    errors: Errors = "raise",
) -> LoadedDataset:
    """Convert already-parsed records (a list, or Sanitation's top-level object) into typed records.

    Same arguments and behaviour as :func:`load_dataset`; ``source`` names the data in error messages.
    """
    _check_args(format, limit, errors)
    detected = format is None
    fmt = format if format is not None else detect_format(data, source=source)
    info = FORMATS[fmt]
    if fmt not in _CONVERTERS:
        raise UnsupportedForEditingError(
            source,
            f"format {fmt!r} is {info.description}; kedit.data only loads "
            "edit-request datasets (see docs/data.md)",
        )
    problems: list[RecordProblem] = []
    shared: list[Probe] = []

    def hint(i: int) -> str:
        if detected or i != 0:
            return ""
        first = data[0] if isinstance(data, Sequence) and data else None
        guess = classify_record(first)
        return (
            f" (format={fmt!r} was forced; the record looks like {guess!r})" if guess and guess != fmt else ""
        )

    if isinstance(data, Mapping):
        if fmt != "knowedit_sanitation":
            raise DataFormatError(
                source,
                f"format {fmt!r} expects a list of records, got a JSON object with keys {sorted(data)[:10]}",
            )
        edit_key, keep_key = ("K_F", "K_R") if "K_F" in data else ("success", "locality")
        edits = data.get(edit_key)
        if not isinstance(edits, list):
            raise DataFormatError(source, f"expected a list, got {type(edits).__name__}", field=edit_key)
        kept = data.get(keep_key) or []
        if not isinstance(kept, list):
            raise DataFormatError(source, f"expected a list, got {type(kept).__name__}", field=keep_key)
        items = edits if limit is None else edits[:limit]
        records = _convert_all(
            items, convert_sanitation_item, path=source, section=edit_key, errors=errors, problems=problems
        )
        shared = _convert_all(
            kept, sanitation_locality, path=source, section=keep_key, errors=errors, problems=problems
        )
        n_source = len(items)
    else:
        if isinstance(data, (str, bytes)) or not isinstance(data, Sequence):
            raise DataFormatError(source, f"expected a list of records, got {type(data).__name__}")
        items = data if limit is None else data[:limit]
        records = _convert_all(
            items, _CONVERTERS[fmt], path=source, section=None, errors=errors, problems=problems, hint=hint
        )
        n_source = len(items)

    if problems:
        logger.warning(
            "%s: skipped %d of %d %s records (errors='collect'); first problem: %s",
            source,
            len(problems),
            n_source,
            fmt,
            problems[0],
        )
    fixed = sum(1 for r in records if isinstance(r, EditRequest) and "dataset_subject" in r.extra)
    if fixed:
        logger.info(
            "%s: %d record(s) had the subject in different capitalisation in the prompt; the prompt's "
            "spelling is used (original in extra['dataset_subject'])",
            source,
            fixed,
        )
    return LoadedDataset(
        path=source,
        format=fmt,
        records=tuple(records),
        problems=tuple(problems),
        shared_locality=tuple(shared),
        n_source_records=n_source,
    )


def load_dataset(
    path: PathLike,
    format: str | None = None,
    *,
    limit: int | None = None,
    errors: Errors = "raise",
) -> LoadedDataset:
    """Load a dataset file into typed records.

    Args:
        path: a JSON array, JSON Lines, or (KnowEdit Sanitation) JSON object file.
        format: one of :data:`FORMATS`; ``None`` detects it from the records (:func:`detect_format`).
        limit: read only the first ``limit`` source records (cases). Formats with several edits per record
            (MQuAKE, multi-rewrite CounterFact) return all edits of those records.
        errors: ``"raise"`` (default): the first malformed record raises :class:`DataFormatError` naming the
            file, record index and field. ``"collect"``: malformed records are skipped and reported in
            :attr:`LoadedDataset.problems` (and a warning is logged); nothing is dropped silently.

    Raises:
        DataFormatError: malformed file or record (strict mode).
        UnsupportedForEditingError: the file is a known dataset whose records are not edit requests
            (TOFU, KnowUnDo, KETI, OneEdit).
    """
    _check_args(format, limit, errors)
    data = read_records(path, limit=limit)
    return parse_records(data, format, source=str(path), limit=limit, errors=errors)


@overload
def load_requests(
    path: PathLike, format: str | None = ..., limit: int | None = ..., *, errors: Literal["raise"] = ...
) -> list[EditRequest]: ...
@overload
def load_requests(
    path: PathLike, format: str | None = ..., limit: int | None = ..., *, errors: Literal["collect"]
) -> tuple[list[EditRequest], list[RecordProblem]]: ...
def load_requests(
    path: PathLike, format: str | None = None, limit: int | None = None, *, errors: Errors = "raise"
) -> list[EditRequest] | tuple[list[EditRequest], list[RecordProblem]]:
    """Load the edit requests of a dataset file (MQuAKE cases flattened to their edits).

    With ``errors="collect"`` returns ``(requests, problems)``; see :func:`load_dataset` for the arguments.

    Raises:
        UnsupportedForEditingError: also for ConvSent, whose topics are not edit requests (load them with
            :func:`load_dataset` and use :func:`~kedit.data.sentiment_requests`).
    """
    dataset = load_dataset(path, format, limit=limit, errors=errors)
    requests = dataset.requests()
    if errors == "collect":
        return requests, list(dataset.problems)
    return requests


def dump_requests(requests: Iterable[EditRequest], path: PathLike, *, jsonl: bool | None = None) -> None:
    """Write requests in the "kedit" format (a JSON array, or JSON Lines if ``jsonl`` or the suffix is
    ``.jsonl``); :func:`load_requests` reads them back."""
    rows = [r.to_dict() for r in requests]
    p = Path(path)
    if jsonl is None:
        jsonl = p.suffix.lower() in (".jsonl", ".ndjson")
    if jsonl:
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    else:
        text = json.dumps(rows, ensure_ascii=False, indent=1) + "\n"
    p.write_text(text, encoding="utf-8")
