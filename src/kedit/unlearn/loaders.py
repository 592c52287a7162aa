"""Unlearning data: ``testbed:<split>`` specs and loaders for the TOFU and KnowUnDo record formats.

* **TOFU** (Maini et al., 2024; ``locuslab/TOFU``): JSON Lines (also a JSON array) of ``{"question", "answer"}``,
  evaluation files add ``paraphrased_answer``, ``perturbed_answer`` (a list) and sometimes
  ``paraphrased_question``; the real-authors / world-facts files are either that shape or multiple choice
  (``option1..4`` with ``answer`` equal to one of them). Note the official ``*_perturbed.json`` files are JSON
  Lines despite the name.
* **KnowUnDo** (Tian et al., 2024, arXiv 2407.01920; ``zjunlp/KnowUnDo``): ``{"text", "labels"}`` items, either a
  plain list or the released wrapping ``[{"train": [...], "val": [...]}]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .splits import FORGET_SPLITS, SCOPE_SPLITS, QAItem, UnlearnSplit, testbed_scope_split, testbed_split

__all__ = ["load_forget_spec", "load_knowundo", "load_tofu", "read_json_records"]


def read_json_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON array file or a JSON Lines file (whatever the extension says)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such data file: {p}")
    text = p.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e})") from None
        return list(data)
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{n}: not a JSON line ({e})") from None
    return out


def _tofu_item(rec: dict[str, Any], where: str) -> QAItem:
    if not isinstance(rec, dict) or "question" not in rec or "answer" not in rec:
        raise ValueError(f"{where}: a TOFU record needs 'question' and 'answer', got {str(rec)[:120]!r}")
    options = [rec[k] for k in sorted(rec) if k.startswith("option")]
    if options:  # multiple choice: the wrong options are the perturbed answers
        if rec["answer"] not in options:
            raise ValueError(f"{where}: answer {rec['answer']!r} is not one of the options {options}")
        perturbed = tuple(o for o in options if o != rec["answer"])
    else:
        pa = rec.get("perturbed_answer", [])
        perturbed = tuple([pa] if isinstance(pa, str) else pa)
    return QAItem(
        question=str(rec["question"]),
        answer=str(rec["answer"]),
        paraphrased_question=str(rec.get("paraphrased_question", "")),
        perturbed_answers=tuple(str(x) for x in perturbed),
        paraphrased_answer=str(rec.get("paraphrased_answer", "")),
    )


def load_tofu(path: str | Path) -> list[QAItem]:
    """The QA items of one TOFU file (any of its splits)."""
    recs = read_json_records(path)
    if not recs:
        raise ValueError(f"{path}: no records")
    return [_tofu_item(r, f"{path}[{i}]") for i, r in enumerate(recs)]


def load_knowundo(path: str | Path, part: str = "val") -> list[QAItem]:
    """The items of one KnowUnDo file (``unlearn`` or ``retention`` scope); ``part`` picks ``train`` / ``val`` in
    the wrapped layout."""
    data = read_json_records(path)
    if len(data) == 1 and isinstance(data[0], dict) and ("train" in data[0] or "val" in data[0]):
        if part not in data[0]:
            raise ValueError(f"{path}: no {part!r} part (has {sorted(data[0])})")
        data = data[0][part]
    out = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or "text" not in rec or "labels" not in rec:
            raise ValueError(f"{path}[{i}]: a KnowUnDo record needs 'text' and 'labels', got {str(rec)[:120]!r}")
        out.append(QAItem(question=str(rec["text"]), answer=str(rec["labels"])))
    if not out:
        raise ValueError(f"{path}: no records")
    return out


def load_forget_spec(spec: str, *, retain: str | None = None, seed: int = 0) -> UnlearnSplit:
    """Resolve a ``--forget`` spec into an :class:`UnlearnSplit`.

    ``testbed:forget01|forget05|forget10``: the testbed split; ``testbed:privacy01|05|10``: the KnowUnDo-scope
    split (:func:`~kedit.unlearn.splits.testbed_scope_split`). A TOFU file path: its items are the forget set and
    ``retain`` (a TOFU file) the retain set. A KnowUnDo ``unlearn`` file: likewise with a ``retention`` file. The
    split is checked (:meth:`UnlearnSplit.check`): empty or overlapping sets are refused with counts.
    """
    if spec.startswith("testbed:"):
        name = spec.split(":", 1)[1]
        if name in SCOPE_SPLITS:
            return testbed_scope_split(name, seed=seed)
        if name not in FORGET_SPLITS:
            known = sorted(FORGET_SPLITS) + sorted(SCOPE_SPLITS)
            raise ValueError(f"unknown testbed forget split {name!r}; expected one of {known}")
        return testbed_split(name, seed=seed)
    path = Path(spec)
    if not path.exists():
        raise ValueError(
            f"unknown forget split {spec!r}: not testbed:<{'|'.join(sorted(FORGET_SPLITS))}> and no such file"
        )
    recs = read_json_records(path)
    is_knowundo = bool(recs) and isinstance(recs[0], dict) and ("text" in recs[0] or "train" in recs[0])
    loader = load_knowundo if is_knowundo else load_tofu
    forget = loader(path)
    kept = loader(retain) if retain else []
    split = UnlearnSplit(name=str(path), forget=forget, retain=kept, info={"format": loader.__name__[5:]})
    if is_knowundo:  # KnowUnDo's two scopes: token accuracy / perplexity on each
        split.scopes = {"unlearn": forget, "retention": kept} if kept else {"unlearn": forget}
    split.check()
    return split
