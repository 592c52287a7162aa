"""Reports over ``kedit unlearn`` runs: a methods × metrics Markdown table and TOFU's forget-quality vs
model-utility scatter (Maini et al., 2024, Fig. 4 style), one point per run and the retain model as the reference
(forget quality 1 by definition, its own model utility). ``kedit report`` calls :func:`write_unlearn_report` when
every directory it is given holds an ``unlearn.json``."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["UNLEARN_COLUMNS", "is_unlearn_run", "load_unlearn_runs", "plot_forget_quality_vs_utility",
           "write_unlearn_report"]

UNLEARN_COLUMNS = (
    "forget_quality",
    "model_utility",
    "retain_model_utility",
    "forget_recall",
    "untouched_recall",
    "mia_loss_auc",
    "unlearn_token_accuracy",
    "retention_token_accuracy",
    "retention_accuracy_kept",
)


def is_unlearn_run(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / "unlearn.json").is_file()


def load_unlearn_runs(dirs: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """The ``unlearn.json`` records of ``dirs`` (each a ``kedit unlearn --out`` directory)."""
    if not dirs:
        raise ValueError("no run directories given")
    out = []
    for d in dirs:
        p = Path(d) / "unlearn.json"
        if not p.is_file():
            raise FileNotFoundError(f"{d}: no unlearn.json (not a `kedit unlearn` run directory)")
        rec = json.loads(p.read_text(encoding="utf-8"))
        rec["_dir"] = str(d)
        out.append(rec)
    return out


def _label(rec: dict[str, Any]) -> str:
    return f"{rec['method']} ({Path(rec['_dir']).name})"


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else None


def plot_forget_quality_vs_utility(runs: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path | None:
    """Forget quality (log scale) against model utility, one point per run with both; the retain model (mean of
    the runs' ``retain_model_utility``, forget quality 1) as a star. ``None`` when no run has forget quality."""
    from kedit.eval.report import _figure

    pts = [(r, _num(r["metrics"].get("forget_quality")), _num(r["metrics"].get("model_utility"))) for r in runs]
    pts = [(r, fq, mu) for r, fq, mu in pts if fq is not None and mu is not None]
    if not pts:
        return None
    fig = _figure(1, width=5.0, height=3.8)
    ax = fig.subplots()
    floor = 1e-12  # the exact KS p-value's floating-point floor (docs/unlearning.md)
    for i, (r, fq, mu) in enumerate(pts):
        ax.scatter([mu], [max(fq, floor)], color=f"C{i % 10}", label=_label(r), zorder=3)
    ref = [u for u in (_num(r["metrics"].get("retain_model_utility")) for r, _, _ in pts) if u is not None]
    if ref:
        ax.scatter([sum(ref) / len(ref)], [1.0], marker="*", s=160, color="black", label="retain model", zorder=4)
    ax.set_yscale("log")
    ax.set_xlabel("model utility")
    ax.set_ylabel("forget quality (KS p-value)")
    ax.axhline(0.05, color="grey", lw=0.8, ls="--")
    ax.legend(fontsize=7, loc="best")
    p = Path(path)
    fig.savefig(p, dpi=110)
    return p


def _cell(v: Any) -> str:
    n = _num(v)
    return "–" if n is None else f"{n:.3g}"


def write_unlearn_report(
    dirs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str], *, plots: bool = True
) -> dict[str, Any]:
    """``report.md`` (one row per run) and, with ``plots``, ``forget_quality_vs_utility.png`` in ``out_dir``."""
    runs = load_unlearn_runs(dirs)
    cols = [c for c in UNLEARN_COLUMNS if any(c in r["metrics"] for r in runs)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if plots:
        p = plot_forget_quality_vs_utility(runs, out / "forget_quality_vs_utility.png")
        if p is not None:
            written.append(str(p))
    lines = ["# kedit unlearning report", "", "| run | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    rows = []
    for r in runs:
        rows.append({"label": _label(r), "metrics": {c: _num(r["metrics"].get(c)) for c in cols}})
        lines.append(f"| {_label(r)} | " + " | ".join(_cell(r["metrics"].get(c)) for c in cols) + " |")
    lines += [""] + [f"![{Path(p).stem}]({Path(p).name})" for p in written]
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"columns": cols, "rows": rows, "markdown": str(md), "plots": written}
