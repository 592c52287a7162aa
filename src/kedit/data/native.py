"""The "kedit" format: a JSON array (or JSON Lines) of :meth:`EditRequest.to_dict` objects."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from kedit.requests import EditRequest, RequestError

from ._common import FieldError

__all__ = ["REQUEST_FIELDS", "convert_kedit"]

REQUEST_FIELDS = frozenset(f.name for f in dataclasses.fields(EditRequest))


def convert_kedit(record: Mapping[str, Any], index: int) -> list[EditRequest]:
    unknown = sorted(set(record) - REQUEST_FIELDS)
    if unknown:
        raise FieldError(unknown[0], f"unknown request field(s) {unknown}; known: {sorted(REQUEST_FIELDS)}")
    for key in ("prompt", "subject", "target_new"):
        if key not in record:
            raise FieldError(key, "missing required field")
    try:
        return [EditRequest.from_dict(record)]
    except RequestError as err:
        message = str(err)
        head = re.split(r"[\s\[.:]", message, maxsplit=1)[0]
        raise FieldError(head if head in REQUEST_FIELDS else None, message) from None
    except TypeError as err:  # e.g. a field given a wrong container type the dataclass cannot take
        raise FieldError(None, str(err)) from None
