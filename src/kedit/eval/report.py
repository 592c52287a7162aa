"""Comparison reports from result directories: a methods × metrics table (terminal + Markdown, means with 95 %
CIs) and PNG plots (metric bars per run; metric vs number of sequential edits).

Plots read result files only, they never recompute. matplotlib is an optional dependency (``kedit[plots]``),
imported lazily; figures are drawn on ``matplotlib.figure.Figure`` objects (no pyplot, no global backend state).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kedit.eval.metrics import HEADLINES
from kedit.eval.runner import EvalRun, load_run

__all__ = [
    "PlotsUnavailableError",
    "default_columns",
    "format_cell",
    "load_runs",
    "metric_id",
    "LIFELONG_COLUMNS",
    "lifelong_label",
    "lifelong_points",
    "plot_lifelong",
    "plot_metric_bars",
    "plot_sequential",
    "pre_rows",
    "render_markdown",
    "run_label",
    "table_rows",
    "write_report",
]


class PlotsUnavailableError(ImportError):
    """matplotlib is not installed."""


def load_runs(dirs: Sequence[str | os.PathLike[str]]) -> list[EvalRun]:
    if not dirs:
        raise ValueError("no result directories given")
    return [load_run(d) for d in dirs]


def default_columns(runs: Sequence[EvalRun]) -> list[str]:
    """The metric names shown: the first run's headline definitions, plus perplexity. Every column is ONE
    definition for every run (runs with another headline style are shown under the same definitions)."""
    style = runs[0].summary.get("headline", "exact_match") if runs else "exact_match"
    return [*HEADLINES[style].values(), "capability/perplexity"]


def run_label(run: EvalRun) -> str:
    s = run.summary
    k = s.get("batch_size")
    proto = s["protocol"] + (f" k={k}" if k and not s["protocol"].startswith("single") else "")
    return f"{s['method']} · {proto} · {s['model']} · n={s['n_evaluated']}" + ("" if s.get("complete", True)
                                                                                   else " (incomplete)")


def format_cell(entry: dict[str, Any] | None, digits: int = 3) -> str:
    if not entry or entry.get("mean") is None:
        return "–"
    m = entry["mean"]
    ci = entry.get("ci95")
    txt = f"{m:.{digits}f}"
    if ci:
        txt += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return txt


def metric_id(run: EvalRun, name: str) -> str | None:
    """The versioned id (``name@vN``) under which ``run`` measured metric ``name``."""
    return (run.manifest.get("metric_definitions", {}).get(name) or {}).get("id")


def table_rows(runs: Sequence[EvalRun], columns: Sequence[str]) -> list[list[str]]:
    """One row per run; a cell measured under another version of its metric than the first run's is marked with
    its id, so one column never silently mixes two definitions."""
    rows = []
    for r in runs:
        cells = []
        for c in columns:
            txt = format_cell(r.summary["metrics"].get(c))
            mine, first = metric_id(r, c), metric_id(runs[0], c)
            if mine != first and txt != "–":
                txt += f" (as {mine})"
            cells.append(txt)
        rows.append([run_label(r)] + cells)
    return rows


def pre_rows(runs: Sequence[EvalRun], columns: Sequence[str]) -> list[list[str]]:
    """Pre-edit means of ``columns`` per run (``–`` where a metric has none); empty if no run has any."""
    rows, any_value = [], False
    for r in runs:
        s = r.summary
        cells = []
        for c in columns:
            if c == "capability/perplexity":
                v = s.get("pre_perplexity")
            else:
                v = (s["metrics"].get(c) or {}).get("pre_mean")
            any_value |= v is not None
            cells.append("–" if v is None else f"{v:.3f}")
        rows.append([run_label(r)] + cells)
    return rows if any_value else []


def render_markdown(runs: Sequence[EvalRun], columns: Sequence[str] | None = None, *, plots: Sequence[str] = ()) -> str:
    cols = list(columns or default_columns(runs))
    lines = ["# kedit evaluation report", ""]
    lines.append("| run | " + " | ".join(cols) + " |")
    lines.append("|---|" + "---|" * len(cols))
    for row in table_rows(runs, cols):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    lines += ["", "Cells: mean over records [95 % percentile-bootstrap CI over records].", ""]
    pre = pre_rows(runs, cols)
    if pre:
        lines += ["Before the edit (the same records on the unedited model; metrics defined only relative to the",
                  "pre-edit model, such as `locality/unchanged`, have no pre-edit value):", ""]
        lines.append("| run | " + " | ".join(cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for row in pre:
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
        lines.append("")
    lines.append("## Definitions")
    lines.append("")
    defs = runs[0].manifest.get("metric_definitions", {}) if runs else {}
    for c in cols:
        d = defs.get(c, {})
        pc = " **Partial credit.**" if d.get("partial_credit") else ""
        lines.append(f"- `{c}` ({d.get('id', '?')}): {d.get('definition', 'unknown')}{pc}")
    lines += ["", "## Runs", ""]
    for r in runs:
        s = r.summary
        lines.append(f"- `{r.out_dir}`: {run_label(r)}; protocol {s['protocol']} ({s['protocol_info']['description']});"
                     f" {s.get('n_errors', 0)} errors; {s.get('seconds')} s"
                     + (f"; {s['subject_conflicts']} subject conflicts in its edit batches"
                        if s.get("subject_conflicts") else "")
                     + (f"; {s['locality_probes_excluded']} neighbourhood probes naming an edited subject excluded"
                        " (locality rule 2)" if s.get("locality_probes_excluded") else ""))
    lifelong = [r for r in runs if "checkpoints" in r.summary]
    if lifelong:
        lines += ["", "## Lifelong (metric at each checkpoint: number of edits made)", ""]
        lines.append("| run | edits | " + " | ".join(LIFELONG_COLUMNS) + " |")
        lines.append("|---|---|" + "---|" * len(LIFELONG_COLUMNS))
        for r in lifelong:
            for c in r.summary["checkpoints"]:
                cells = [_lifelong_text(k, c["metrics"].get(k)) for k in LIFELONG_COLUMNS]
                lines.append(f"| {run_label(r)} | {c['n_edits']} | " + " | ".join(cells) + " |")
        lines += ["", "Retention: reliability/generalization over every fact edited so far (by its newest edit); "
                  "locality/recall on the same fixed probes of untouched facts at every checkpoint; "
                  "`cost/memory_bytes` in MiB.", ""]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def _figure(ncols: int, nrows: int = 1, width: float = 3.6, height: float = 3.2) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise PlotsUnavailableError("plots need matplotlib: pip install 'kedit[plots]'") from e
    return Figure(figsize=(width * ncols, height * nrows), layout="constrained")


def plot_metric_bars(runs: Sequence[EvalRun], columns: Sequence[str], path: str | os.PathLike[str]) -> Path:
    """One panel per metric, one bar per run, 95 % CI as error bars."""
    fig = _figure(len(columns))
    axes = fig.subplots(1, len(columns), squeeze=False)[0]
    labels = [f"{r.summary['method']}\n{r.summary['protocol']}" for r in runs]
    for ax, col in zip(axes, columns):
        means, lo, hi = [], [], []
        for r in runs:
            e = r.summary["metrics"].get(col) or {}
            m = e.get("mean")
            ci = e.get("ci95") or [m, m]
            means.append(m if m is not None else 0.0)
            lo.append(0.0 if m is None else max(m - ci[0], 0.0))
            hi.append(0.0 if m is None else max(ci[1] - m, 0.0))
        ax.bar(range(len(runs)), means, yerr=[lo, hi], capsize=3, color=[f"C{i}" for i in range(len(runs))])
        ax.set_xticks(range(len(runs)), labels, fontsize=7, rotation=30, ha="right")
        ax.set_title(col, fontsize=9)
    p = Path(path)
    fig.savefig(p, dpi=110)
    return p


def _sequential_points(run: EvalRun, metric: str) -> list[tuple[float, float]]:
    """(number of edits applied, metric) points: per step for sequential-immediate (running mean over the records
    evaluated so far), one point for sequential-final."""
    s = run.summary
    if s["protocol"].startswith("sequential-final"):
        m = (s["metrics"].get(metric) or {}).get("mean")
        return [] if m is None else [(float(s["n_evaluated"]), float(m))]
    by_n: dict[int, list[float]] = {}
    for rec in run.records:
        v = (rec.get("metrics") or {}).get(metric)
        if v is not None:
            by_n.setdefault(int(rec["n_edits"]), []).append(float(v))
    pts, acc = [], []
    for n in sorted(by_n):
        acc += by_n[n]
        pts.append((float(n), sum(acc) / len(acc)))
    return pts


def plot_sequential(runs: Sequence[EvalRun], columns: Sequence[str], path: str | os.PathLike[str]) -> Path | None:
    """Metric vs number of sequential edits, one line per (method, protocol); ``None`` if no sequential run."""
    seq = [r for r in runs if r.summary["protocol"].startswith("sequential")]
    if not seq:
        return None
    cols = list(columns)  # perplexity included, on a log axis: it shows a collapsing model best
    fig = _figure(len(cols))
    axes = fig.subplots(1, len(cols), squeeze=False)[0]
    groups: dict[str, list[EvalRun]] = {}
    for r in seq:
        groups.setdefault(f"{r.summary['method']} · {r.summary['protocol']}", []).append(r)
    for ax, col in zip(axes, cols):
        for i, (label, rs) in enumerate(sorted(groups.items())):
            pts = sorted(p for r in rs for p in _sequential_points(r, col))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=f"C{i}", label=label)
        ax.set_xlabel("number of sequential edits")
        ax.set_title(col, fontsize=9)
        if col == "capability/perplexity" and ax.has_data():
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    p = Path(path)
    fig.savefig(p, dpi=110)
    return p


#: what the lifelong curves and table show (metric names of the checkpoint metrics)
LIFELONG_COLUMNS = ("reliability/exact_match", "generalization/exact_match", "locality/untouched_unchanged",
                    "locality/untouched_recall", "reedit/newest_wins", "capability/perplexity",
                    "cost/seconds_per_edit", "cost/memory_bytes")


def _lifelong_text(name: str, entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("mean") is None:
        return "–"
    if name == "cost/memory_bytes":
        return f"{entry['mean'] / 2**20:.3f}"
    return format_cell(entry)


def lifelong_points(run: EvalRun, metric: str, *, relative: bool = False) -> list[tuple[float, float]]:
    """(number of edits, metric) at each checkpoint of a lifelong run (``[]`` for other runs). ``relative``: the
    metric divided by its value on the unedited model (``pre_mean``; checkpoints without one are left out), e.g.
    perplexity as a ratio to the base model's."""
    pts = []
    for c in run.summary.get("checkpoints") or []:
        e = c["metrics"].get(metric) or {}
        m = e.get("mean")
        if m is None:
            continue
        if relative:
            base = e.get("pre_mean")
            if not base:
                continue
            m = m / base
        pts.append((float(c["n_edits"]), float(m)))
    return pts


def lifelong_label(run: EvalRun) -> str:
    """The curve's name: method, the strategy options that change it (``+NAS`` for ``norm_anchor``, the strategy
    when it is not the method's default ``spread`` and not already in the method name), k, model, and
    ``(incomplete)`` for a run stopped before T."""
    s = run.summary
    cfg = run.manifest.get("method_config") or {}
    name = str(s["method"])
    strategy = cfg.get("strategy")
    if strategy and strategy != "spread" and not name.endswith(str(strategy)):
        name += f"-{strategy}"
    if cfg.get("norm_anchor"):
        name += "+NAS"
    label = f"{name} k={s.get('batch_size')} {s.get('model', '')}".rstrip()
    return label + ("" if s.get("complete", True) else " (incomplete)")


def plt_null_formatter():
    """No labels on minor ticks (a log axis over one decade otherwise prints 5×10¹, 6×10¹ ... on top of each other)."""
    from matplotlib.ticker import NullFormatter

    return NullFormatter()


#: perplexity above this multiple of the unedited model's is a collapse (the line drawn on the perplexity panel)
COLLAPSE_PPL_RATIO = 2.0


def plot_lifelong(runs: Sequence[EvalRun], path: str | os.PathLike[str],
                  columns: Sequence[str] = LIFELONG_COLUMNS) -> Path | None:
    """Lifelong curves: one panel per metric, metric vs number of edits (log x), one line per run
    (:func:`lifelong_label`); perplexity as a ratio to the unedited model on a log axis, with the collapse line at
    :data:`COLLAPSE_PPL_RATIO` × base; ``None`` if no run is lifelong. Runs on the same model share a line style
    (solid for the first model, dashed, dotted ...), so more than ten runs stay apart."""
    ll = [r for r in runs if r.summary.get("checkpoints")]
    if not ll:
        return None
    cols = list(columns)
    ncols = 4
    side_legend = len(ll) > 4  # many runs: the legend gets a panel of its own, not the data's
    nrows = (len(cols) + side_legend + ncols - 1) // ncols
    fig = _figure(ncols, nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    xs = [c["n_edits"] for r in ll for c in r.summary["checkpoints"]]
    models = list(dict.fromkeys(str(r.summary.get("model")) for r in ll))
    styles = ("-", "--", ":", "-.")
    markers = ("o", "s", "^", "D", "v", "P", "X", "*")
    for ax, col in zip(axes, cols):
        ys: list[float] = []
        ratio = col == "capability/perplexity"
        for i, r in enumerate(ll):
            pts = lifelong_points(r, col, relative=ratio)
            if col == "cost/memory_bytes":
                pts = [(x, y / 2**20) for x, y in pts]
            if pts:
                ls = styles[models.index(str(r.summary.get("model"))) % len(styles)]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[(i // 10) % len(markers)], ms=3,
                        color=f"C{i % 10}", linestyle=ls, label=lifelong_label(r))
                ys += [p[1] for p in pts]
        ax.set_xscale("log")
        ax.set_xlim(min(xs) / 1.2, max(xs) * 1.2)  # every panel on the same x range, even one with fewer points
        ax.xaxis.set_minor_formatter(plt_null_formatter())
        ax.set_xlabel("number of edits")
        title = col + (" (MiB)" if col == "cost/memory_bytes" else "")
        ax.set_title(f"perplexity / base (log; -- {COLLAPSE_PPL_RATIO:g}× = collapse)" if ratio else title, fontsize=9)
        if not ys:
            continue
        if ratio:
            ax.set_yscale("log")
            ax.axhline(COLLAPSE_PPL_RATIO, color="grey", linestyle="--", linewidth=0.8)
            ax.set_ylim(min(min(ys), 1.0) / 1.1, max(max(ys), COLLAPSE_PPL_RATIO) * 1.3)
        elif col.startswith(("cost/", "capability/")):
            lo, hi = min(ys), max(ys)
            pad = max(hi - lo, 0.05 * abs(hi), 1e-9) * 0.5  # a flat curve is drawn flat, not magnified noise
            ax.set_ylim(max(lo - pad, 0.0) if lo >= 0 else lo - pad, hi + pad)
        else:  # rates: always the whole [0, 1] scale
            ax.set_ylim(-0.02, 1.02)
    for ax in axes[len(cols):]:
        ax.set_visible(False)
    if side_legend:
        handles, labels = axes[0].get_legend_handles_labels()
        free = axes[len(cols)]
        free.set_visible(True)
        free.axis("off")
        free.legend(handles, labels, fontsize=6, loc="center")
    else:
        axes[0].legend(fontsize=7)
    p = Path(path)
    fig.savefig(p, dpi=110)
    return p


def write_report(
    dirs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    columns: Sequence[str] | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Write ``report.md`` (+ ``metrics.png``, ``sequential.png`` when there are sequential runs, ``lifelong.png``
    when there are lifelong runs) to ``out_dir``;
    returns the paths and the table."""
    runs = load_runs(dirs)
    cols = list(columns or default_columns(runs))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs: list[str] = []
    if plots:
        pngs.append(str(plot_metric_bars(runs, cols, out / "metrics.png")))
        seq = plot_sequential(runs, cols, out / "sequential.png")
        if seq is not None:
            pngs.append(str(seq))
        ll = plot_lifelong(runs, out / "lifelong.png")
        if ll is not None:
            pngs.append(str(ll))
    md = out / "report.md"
    md.write_text(render_markdown(runs, cols, plots=pngs), encoding="utf-8")
    return {
        "markdown": str(md),
        "plots": pngs,
        "columns": cols,
        "rows": [{"run": str(r.out_dir), "label": run_label(r),
                  "metrics": {c: r.summary["metrics"].get(c) for c in cols}} for r in runs],
    }
