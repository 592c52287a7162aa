"""Write edit requests in the real public dataset formats (CounterFact, zsRE/MEND, KnowEdit).

The key sets match the public files exactly (see ``/work/shared/data`` samples):

* CounterFact (ROME/MEMIT): ``case_id, pararel_idx, requested_rewrite{prompt, relation_id, subject,
  target_new{str, id}, target_true{str, id}}, paraphrase_prompts, neighborhood_prompts, attribute_prompts,
  generation_prompts``;
* zsRE (MEND/ROME eval): ``subject, src, pred, rephrase, alt, answers, loc, loc_ans, cond``;
* KnowEdit (ZsRE-test-all shape): ``subject, target_new, prompt, ground_truth[list], rephrase_prompt, cond,
  locality{Relation_Specificity: [{prompt, ground_truth}]}, portability{Reasoning: [...], Subject_Aliasing: [...]}``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..requests import EditRequest

__all__ = ["export_all", "to_counterfact", "to_knowedit", "to_zsre", "write_json"]


def _eid(name: str) -> str:
    return f"tb:{name}"


def _int_id(req: EditRequest, i: int) -> int:
    try:
        return int(req.case_id) if req.case_id is not None else i
    except ValueError:
        return i


def to_counterfact(requests: Sequence[EditRequest]) -> list[dict[str, Any]]:
    out = []
    for i, r in enumerate(requests):
        extra = dict(r.extra)
        spec = [p["prompt"] for p in extra.get("relation_specificity", [])]
        out.append(
            {
                "case_id": _int_id(r, i),
                "pararel_idx": _int_id(r, i),
                "requested_rewrite": {
                    "prompt": r.prompt,
                    "relation_id": str(extra.get("relation", "")),
                    "target_new": {"str": r.target_new, "id": _eid(r.target_new)},
                    "target_true": {"str": r.target_true or "", "id": _eid(r.target_true or "")},
                    "subject": r.subject,
                },
                "paraphrase_prompts": list(r.paraphrases),
                "neighborhood_prompts": [p.prompt for p in r.neighborhood],
                "attribute_prompts": list(extra.get("attribute_prompts", [])),
                "generation_prompts": spec or [r.text],
            }
        )
    return out


def to_zsre(requests: Sequence[EditRequest]) -> list[dict[str, Any]]:
    out = []
    for r in requests:
        loc = r.neighborhood[0] if r.neighborhood else None
        true = r.target_true or ""
        out.append(
            {
                "subject": r.subject,
                "src": r.text,
                "pred": true,
                "rephrase": r.paraphrases[0] if r.paraphrases else r.text,
                "alt": r.target_new,
                "answers": [true],
                "loc": loc.prompt if loc else "",
                "loc_ans": (loc.answer or "") if loc else "",
                "cond": f"{true} >> {r.target_new} || {r.text}",
            }
        )
    return out


def to_knowedit(requests: Sequence[EditRequest]) -> list[dict[str, Any]]:
    out = []
    for r in requests:
        extra = dict(r.extra)
        true = r.target_true or ""
        portability: dict[str, list[dict[str, Any]]] = {}
        reasoning = [{"prompt": p.prompt, "ground_truth": p.answer} for p in r.portability if p.answer]
        if reasoning:
            portability["Reasoning"] = reasoning
        if r.aliases:
            portability["Subject_Aliasing"] = [
                {"prompt": r.prompt.replace("{}", a, 1), "ground_truth": r.target_new} for a in r.aliases
            ]
        locality = {
            "Relation_Specificity": [
                {"prompt": p["prompt"], "ground_truth": [p["answer"]]}
                for p in extra.get("relation_specificity", [])
            ]
        }
        out.append(
            {
                "subject": r.subject,
                "target_new": r.target_new,
                "prompt": r.text,
                "ground_truth": [true],
                "rephrase_prompt": r.paraphrases[0] if r.paraphrases else r.text,
                "cond": f"{true} >> {r.target_new} || {r.text}",
                "locality": locality,
                "portability": portability,
            }
        )
    return out


def write_json(records: Any, path: str | Path) -> Path:
    """Write ``records`` like the public files (``indent=4``, ASCII) with a trailing newline."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=4, ensure_ascii=True) + "\n", encoding="utf-8")
    return path


def export_all(requests: Sequence[EditRequest], out_dir: str | Path) -> dict[str, Path]:
    """Write ``counterfact.json``, ``zsre.json`` and ``knowedit.json`` into ``out_dir``."""
    out_dir = Path(out_dir)
    return {
        "counterfact": write_json(to_counterfact(requests), out_dir / "counterfact.json"),
        "zsre": write_json(to_zsre(requests), out_dir / "zsre.json"),
        "knowedit": write_json(to_knowedit(requests), out_dir / "knowedit.json"),
    }
