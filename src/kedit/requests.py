"""Typed request records.

An :class:`EditRequest` says "in the sentence *prompt*, the *subject* should now be followed by *target_new*".
It is validated when constructed, so every method downstream can rely on a well-formed request:

* ``prompt`` either holds exactly one ``"{}"`` slot where the subject goes, or contains the subject verbatim
  exactly once (it is then turned into a template);
* ``subject`` and ``target_new`` are non-empty strings;
* every optional field has the declared type.

Targets are stored without surrounding whitespace; the core adds the single separating space when it joins
prompt and target (as the reference ROME/MEMIT code does), so ``" Paris"`` and ``"Paris"`` are the same request.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EditRequest", "Probe", "RequestError", "locate_subject"]


class RequestError(ValueError):
    """A request is malformed; the message names the offending field."""


def _check_str(name: str, value: Any, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{name} must be a string, got {type(value).__name__}: {value!r}")
    if not allow_empty and not value.strip():
        raise RequestError(f"{name} must be a non-empty string")
    return value


@dataclass(frozen=True)
class Probe:
    """A prompt used to evaluate an edit: a paraphrase, a neighbourhood or a portability question.

    Attributes:
        prompt: the full text fed to the model (subject already filled in).
        answer: the expected continuation, if known. For neighbourhood probes this is the answer the model should
            keep; ``None`` means "compare with the pre-edit model only".
        kind: a free label (e.g. ``"Reasoning"``, ``"Relation_Specificity"``, ``"two_hop"``).
    """

    prompt: str
    answer: str | None = None
    kind: str = ""

    def __post_init__(self) -> None:
        _check_str("Probe.prompt", self.prompt)
        if self.answer is not None:
            object.__setattr__(self, "answer", _check_str("Probe.answer", self.answer).strip())
        _check_str("Probe.kind", self.kind, allow_empty=True)

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "answer": self.answer, "kind": self.kind}

    @classmethod
    def coerce(cls, value: Any, field_name: str) -> Probe:
        """Build a probe from a ``Probe``, a plain prompt string, a ``(prompt, answer)`` pair or a dict."""
        if isinstance(value, Probe):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, Mapping):
            unknown = set(value) - {"prompt", "answer", "kind"}
            if unknown:
                raise RequestError(f"{field_name}: unknown probe keys {sorted(unknown)}")
            if "prompt" not in value:
                raise RequestError(f"{field_name}: probe dict needs a 'prompt' key")
            return cls(value["prompt"], value.get("answer"), value.get("kind", ""))
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return cls(value[0], value[1])
        raise RequestError(
            f"{field_name}: expected a prompt string, (prompt, answer) pair, dict or Probe, got {value!r}"
        )


def _occurrences(text: str, sub: str) -> list[int]:
    """Start of every (possibly overlapping) occurrence of ``sub`` in ``text``."""
    out, i = [], text.find(sub)
    while i >= 0:
        out.append(i)
        i = text.find(sub, i + 1)
    return out


def _whole_word(text: str, start: int, sub: str) -> bool:
    """Whether ``text[start:start+len(sub)]`` is not glued to a letter or digit: the character before (after) the
    match is not alphanumeric -- checked only where the subject itself begins (ends) with one, like a regex word
    boundary."""
    end = start + len(sub)
    if sub[:1].isalnum() and start > 0 and text[start - 1].isalnum():
        return False
    if sub[-1:].isalnum() and end < len(text) and text[end].isalnum():
        return False
    return True


def locate_subject(prompt: str, subject: str, *, field: str = "prompt") -> int:
    """Character offset of ``subject`` in ``prompt`` (a literal sentence, no ``"{}"``).

    A unique occurrence wins. Otherwise the unique *whole-word* occurrence wins -- ``"Ann"`` in
    ``"Annabel said that Ann was born in"`` is the second one, since the first is glued to ``"abel"``. Raises
    :class:`RequestError` when the subject does not occur, or when even the whole-word occurrences are ambiguous
    (then mark the one to edit with ``"{}"``); ``field`` names the prompt in the message.
    """
    hits = _occurrences(prompt, subject)
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise RequestError(
            f"subject {subject!r} does not occur in {field} {prompt!r}; put it in the prompt or mark its place with '{{}}'"
        )
    whole = [i for i in hits if _whole_word(prompt, i, subject)]
    if len(whole) == 1:
        return whole[0]
    raise RequestError(
        f"subject {subject!r} occurs {len(hits)} times in {field} {prompt!r} ({len(whole)} of them as a whole word); "
        "mark the occurrence to edit with '{}'"
    )


def _probes(name: str, values: Any) -> tuple[Probe, ...]:
    if values is None:
        return ()
    if isinstance(values, (str, Mapping)):
        values = [values]
    if not isinstance(values, Iterable):
        raise RequestError(f"{name} must be a sequence of probes, got {type(values).__name__}")
    return tuple(Probe.coerce(v, f"{name}[{i}]") for i, v in enumerate(values))


def _strings(name: str, values: Any) -> tuple[str, ...]:
    if values is None:
        return ()
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, Iterable):
        raise RequestError(f"{name} must be a sequence of strings, got {type(values).__name__}")
    return tuple(_check_str(f"{name}[{i}]", v) for i, v in enumerate(values))


@dataclass(frozen=True)
class EditRequest:
    """One fact to insert: ``prompt`` (with ``subject``) should continue with ``target_new``.

    Attributes:
        prompt: a template with one ``"{}"`` where the subject goes (``"{} was born in"``), or the literal
            sentence containing ``subject`` exactly once. Stored normalised as a template; see :attr:`text`.
        subject: the entity whose fact changes.
        target_new: the new object (leading/trailing whitespace removed).
        target_true: the current object, if known (used by metrics and by KN).
        paraphrases: other prompts that should now also produce ``target_new`` (generalisation).
        neighborhood: prompts about other subjects whose answers must not change (locality).
        portability: prompts whose answers should follow from the edit (reasoning / multi-hop).
        aliases: other names of the subject; ``prompt`` with an alias should also produce ``target_new``.
        case_id: an identifier carried through to results.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[Probe, ...] = ()
    portability: tuple[Probe, ...] = ()
    aliases: tuple[str, ...] = ()
    case_id: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        ident = f" (case {self.case_id})" if self.case_id is not None else ""
        try:
            prompt = _check_str("prompt", self.prompt)
            subject = _check_str("subject", self.subject)
            target_new = _check_str("target_new", self.target_new).strip()
            if self.target_true is not None:
                object.__setattr__(self, "target_true", _check_str("target_true", self.target_true).strip())
            n_slots = prompt.count("{}")
            if n_slots > 1:
                raise RequestError(f"prompt has {n_slots} '{{}}' slots, expected exactly one: {prompt!r}")
            if n_slots == 0:
                at = locate_subject(prompt, subject)
                prompt = prompt[:at] + "{}" + prompt[at + len(subject) :]
            object.__setattr__(self, "prompt", prompt)
            object.__setattr__(self, "target_new", target_new)
            object.__setattr__(self, "paraphrases", _strings("paraphrases", self.paraphrases))
            object.__setattr__(self, "aliases", _strings("aliases", self.aliases))
            object.__setattr__(self, "neighborhood", _probes("neighborhood", self.neighborhood))
            object.__setattr__(self, "portability", _probes("portability", self.portability))
            if self.case_id is not None:
                object.__setattr__(self, "case_id", str(self.case_id))
            if not isinstance(self.extra, Mapping):
                raise RequestError(f"extra must be a mapping, got {type(self.extra).__name__}")
        except RequestError as err:
            raise RequestError(f"{err}{ident}") from None

    # -- derived views ---------------------------------------------------------------------------------------------
    @property
    def template(self) -> str:
        """The prompt with ``"{}"`` where the subject goes."""
        return self.prompt

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject, 1)

    @property
    def subject_span(self) -> tuple[int, int]:
        """Character span ``[start, end)`` of the subject inside :attr:`text`."""
        start = self.prompt.index("{}")
        return start, start + len(self.subject)

    def with_target(self, target_new: str) -> EditRequest:
        return dataclasses.replace(self, target_new=target_new)

    # -- serialisation ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "subject": self.subject,
            "target_new": self.target_new,
            "target_true": self.target_true,
            "paraphrases": list(self.paraphrases),
            "neighborhood": [p.to_dict() for p in self.neighborhood],
            "portability": [p.to_dict() for p in self.portability],
            "aliases": list(self.aliases),
            "case_id": self.case_id,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EditRequest:
        """Inverse of :meth:`to_dict`; unknown keys are an error (they are usually a typo)."""
        if not isinstance(data, Mapping):
            raise RequestError(f"an edit request must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise RequestError(f"unknown request fields {sorted(unknown)}; known: {sorted(known)}")
        missing = [k for k in ("prompt", "subject", "target_new") if k not in data]
        if missing:
            raise RequestError(f"request is missing required fields {missing}")
        return cls(**{k: v for k, v in data.items() if v is not None or k in ("target_true", "case_id")})


def as_requests(items: Sequence[EditRequest | Mapping[str, Any]]) -> list[EditRequest]:
    """Coerce a list of requests or dicts to :class:`EditRequest` objects, naming the bad one on error by its
    1-based position (``request 3`` is ``items[2]``; the message already names its ``case_id`` when it has one)."""
    out = []
    for i, item in enumerate(items):
        try:
            out.append(item if isinstance(item, EditRequest) else EditRequest.from_dict(item))
        except RequestError as err:
            raise RequestError(f"request {i + 1}: {err}") from None
    return out
