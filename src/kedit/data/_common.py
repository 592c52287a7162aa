"""Helpers shared by the format converters: field access with dotted names, answer lists, request building."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from kedit.requests import EditRequest, Probe, RequestError, locate_subject

_MISSING = object()

# EditRequest / Probe field names, as they start RequestError messages.
_REQUEST_FIELDS = (
    "prompt",
    "subject",
    "target_new",
    "target_true",
    "paraphrases",
    "neighborhood",
    "portability",
    "aliases",
    "case_id",
    "extra",
)


class FieldError(Exception):
    """Raised by a converter; the loader adds the file and record index and turns it into DataFormatError."""

    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def get(
    record: Mapping[str, Any],
    key: str,
    *,
    where: str = "",
    required: bool = True,
    types: type | tuple[type, ...] = str,
    default: Any = None,
) -> Any:
    """``record[key]`` checked against ``types``; ``where`` is the dotted prefix used in error field names."""
    name = f"{where}.{key}" if where else key
    value = record.get(key, _MISSING)
    if value is _MISSING or (value is None and not required):
        if required:
            raise FieldError(name, "missing required field")
        return default
    if not isinstance(value, types):
        expected = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise FieldError(name, f"expected {expected}, got {type_name(value)}: {_short(value)}")
    if isinstance(value, str) and required and not value.strip():
        raise FieldError(name, "must be a non-empty string")
    return value


def mapping(value: Any, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise FieldError(name, f"expected an object, got {type_name(value)}: {_short(value)}")
    return value


def strings(value: Any, name: str, *, allow_empty_list: bool = True) -> list[str]:
    """A string or a list of strings -> list of non-empty strings (order kept)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise FieldError(name, f"expected a string or a list of strings, got {type_name(value)}")
    out = []
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise FieldError(f"{name}[{i}]", f"expected a string, got {type_name(v)}: {_short(v)}")
        if v.strip():
            out.append(v)
    if not out and not allow_empty_list:
        raise FieldError(name, "expected at least one non-empty string")
    return out


def answers(value: Any, name: str) -> list[str]:
    """All acceptable answers of a ground-truth field, flattened, stripped, de-duplicated, order kept.

    Accepts the shapes found in the wild: ``"Paris"``, ``["Paris", "City of Light"]`` (answer + aliases) and
    ``[["Soviet Union", "USSR"], ["Russia"]]`` (several answers, each with aliases; KnowEdit wiki_recent).
    Empty strings and empty inner lists are dropped; the result may be empty.
    """
    out: list[str] = []

    def add(v: Any, where: str, depth: int) -> None:
        if v is None and depth > 0:  # [None] / [[None]]: no answer given
            return
        if isinstance(v, str):
            s = v.strip()
            if s and s not in out:
                out.append(s)
        elif isinstance(v, list) and depth < 2:
            for i, item in enumerate(v):
                add(item, f"{where}[{i}]", depth + 1)
        else:
            raise FieldError(
                where, f"expected a string or a (nested) list of strings, got {type_name(v)}: {_short(v)}"
            )

    if value is not None:
        add(value, name, 0)
    return out


def probe(prompt: Any, answer_list: Sequence[str], kind: str, name: str) -> Probe:
    """A :class:`Probe` whose answer is the first acceptable answer (``None`` when there is none)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise FieldError(
            name, f"probe prompt must be a non-empty string, got {type_name(prompt)}: {_short(prompt)}"
        )
    try:
        return Probe(prompt, answer_list[0] if answer_list else None, kind)
    except RequestError as err:
        raise FieldError(name, str(err)) from None


def _short(value: Any, n: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def place_subject(prompt: str, subject: str, prompt_field: str, subject_field: str) -> tuple[str, str, bool]:
    """Check that ``subject`` can be located in ``prompt``; return ``(prompt, subject, case_fixed)``.

    Known quirk (zsRE variants): the subject is spelled with different capitalisation in the question
    (``"Saint Columba Altarpiece"`` vs ``"... Saint Columba altarpiece?"``). When the subject does not occur
    verbatim but occurs exactly once ignoring case, the prompt's spelling is used as the subject and
    ``case_fixed`` is True (the loader keeps the dataset's spelling in ``extra["dataset_subject"]``).
    Any other mismatch is a :class:`FieldError` on the subject field.
    """
    if "{}" in prompt:
        return prompt, subject, False
    if subject in prompt:  # EditRequest's rule: the unique occurrence, else the unique whole-word one
        try:
            locate_subject(prompt, subject, field=prompt_field)
        except RequestError as err:
            raise FieldError(subject_field, f"{err}: cannot tell which occurrence to edit") from None
        return prompt, subject, False
    found = [m.start() for m in re.finditer(re.escape(subject), prompt, flags=re.IGNORECASE)]
    if len(found) == 1:
        start = found[0]
        return prompt, prompt[start : start + len(subject)], True
    raise FieldError(
        subject_field,
        f"subject {subject!r} does not occur in {prompt_field} {prompt!r}"
        + (
            " (not even ignoring case)"
            if not found
            else f" verbatim, and occurs {len(found)} times ignoring case"
        ),
    )


def build_request(fields: Mapping[str, str], **kwargs: Any) -> EditRequest:
    """``EditRequest(**kwargs)`` with the subject-placement check and dataset field names in errors.

    ``fields`` maps EditRequest field names to the dataset's names (``{"prompt": "src", "target_new": "alt"}``);
    fields not listed keep their own name.
    """
    prompt_field = fields.get("prompt", "prompt")
    subject_field = fields.get("subject", "subject")
    prompt, subject = kwargs.get("prompt"), kwargs.get("subject")
    if isinstance(prompt, str) and isinstance(subject, str) and subject.strip():
        prompt, new_subject, fixed = place_subject(prompt, subject, prompt_field, subject_field)
        if fixed:
            extra = dict(kwargs.get("extra") or {})
            extra["dataset_subject"] = subject
            kwargs["extra"] = extra
            kwargs["subject"] = new_subject
    try:
        return EditRequest(**kwargs)
    except RequestError as err:
        message = str(err)
        head = re.split(r"[\s\[]", message, maxsplit=1)[0]
        field = fields.get(head, head) if head in _REQUEST_FIELDS else None
        raise FieldError(field, message) from None


def leftovers(record: Mapping[str, Any], used: set[str]) -> dict[str, Any]:
    """The record's keys not consumed by a converter (kept in ``EditRequest.extra`` so nothing is lost)."""
    return {k: v for k, v in record.items() if k not in used}
