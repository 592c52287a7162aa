"""``kedit eval`` and ``kedit report`` (registered on the main Typer app by :func:`register`, which
:mod:`kedit.cli` calls when it is imported). The shared helpers come from :mod:`kedit.cli_common`, so this module
never imports :mod:`kedit.cli`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

__all__ = ["register"]

_ASPECTS = ("reliability", "generalization", "locality", "portability", "fluency")


def _ppl_texts(model: str, path: Path | None, n: int, *, heldout: bool = False) -> list[str] | None:
    """Perplexity texts: the file's lines, else for testbed models the world's filler (``heldout``: the held-out
    filler stream, never trained -- what lifelong/v1 uses)."""
    if n <= 0:
        return None
    if path is not None:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        return lines[:n]
    from kedit.api import TESTBED_MODELS

    if model in TESTBED_MODELS:
        from kedit.testbed import load_world

        if heldout:
            from kedit.testbed.gates import heldout_filler

            return heldout_filler(load_world(), n)
        return list(load_world().filler[:n])
    return None


def _parse_checkpoints(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise ValueError(f"--checkpoints must be comma-separated integers, got {text!r}") from None


def _summary_json(summary: dict[str, Any]) -> dict[str, Any]:
    metrics = summary["metrics"]
    return {
        "protocol": summary["protocol"],
        "method": summary["method"],
        "model": summary["model"],
        "n": summary["n_evaluated"],
        "n_errors": summary["n_errors"],
        "n_skipped": summary.get("n_skipped", 0),
        "subject_conflicts": summary.get("subject_conflicts"),
        "locality_probes_excluded": summary.get("locality_probes_excluded"),
        "metrics": {k: metrics[k] for k in (*_ASPECTS, *[m for m in metrics if m not in _ASPECTS])},
        "seconds": summary["seconds"],
        **({"stream": summary.get("stream"), "checkpoints": summary["checkpoints"]} if "checkpoints" in summary
           else {}),
    }


_LIFELONG_COLUMNS = (("reliability", "reliability"), ("generalization", "generalization"),
                     ("locality", "locality/untouched_unchanged"), ("recall", "locality/untouched_recall"),
                     ("newest wins", "reedit/newest_wins"), ("ppl", "capability/perplexity"),
                     ("s/edit", "cost/seconds_per_edit"), ("MB held", "cost/memory_bytes"))


def _lifelong_cell(name: str, entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("mean") is None:
        return "–"
    m = float(entry["mean"])
    if name == "cost/memory_bytes":
        return f"{m / 2**20:.2f}"
    if name in ("capability/perplexity", "cost/seconds_per_edit"):
        return f"{m:.3f}"
    return f"{m:.3f} (n={entry.get('n')})"


def register(app: typer.Typer) -> None:
    """Add the ``eval`` and ``report`` commands to ``app`` (once: calling it again changes nothing)."""
    from kedit.cli_common import (
        cell,
        check_model_available,
        edit_context,
        err,
        fail,
        load_or_fail,
        method_name,
        out,
        parse_sets,
        progress_bars,
        resolve_requests,
        validate_method,
    )

    if any(c.name in ("eval", "report") for c in app.registered_commands):
        return

    @app.command("eval")
    def eval_cmd(
        model: str = typer.Option(..., "--model", "-m", help="testbed-gpt2, testbed-llama, or an HF name/path."),
        method: str = typer.Option(..., "--method", help="Editing method (see `kedit methods`)."),
        data: str = typer.Option(..., "--data", "-d", help="FILE (any supported format), testbed[:N] or testbed:A-B."),
        protocol: str = typer.Option("single/v1", "--protocol", "-p",
                                     help="single/v1 | batch/v1 | sequential-final/v1 | sequential-immediate/v1 | "
                                          "lifelong/v1 | unlearn/v1 (METHOD: an unlearning method, DATA: a "
                                          "forget split, e.g. testbed:forget10; as `kedit unlearn`, --limit caps each measured set)."),
        batch_size: int = typer.Option(1, "--batch-size", "-k", min=1,
                                       help="Edits per compute call (batch/sequential)."),
        limit: int | None = typer.Option(None, "--limit", min=1, help="Evaluate at most N records."),
        distinct: bool = typer.Option(False, "--distinct-subjects",
                                      help="Keep only the first request of each subject (conflict-free batches)."),
        whole: bool = typer.Option(False, "--whole-subjects",
                                   help="Every request of as few subjects as give --limit requests, interleaved "
                                        "(lifelong streams that leave the other subjects untouched)."),
        per_batch: bool = typer.Option(False, "--distinct-per-batch",
                                       help="Reorder (keep all) so each batch of k has distinct subjects where possible."),
        out_dir: Path = typer.Option(..., "--out", "-o", help="Result directory (a rerun resumes it)."),
        json_out: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout."),
        fmt: str | None = typer.Option(None, "--format", help="Force the dataset format of FILE."),
        strategy: str | None = typer.Option(None, "--strategy", help="e.g. 'blue' for MEMIT/PMET/AlphaEdit."),
        sets: list[str] = typer.Option([], "--set", help="Method config override key=value (JSON), repeatable."),
        eval_batch_size: int = typer.Option(64, "--eval-batch-size", min=1, help="Prompts per forward pass."),
        headline: str = typer.Option("exact_match", "--headline",
                                     help="Summary definitions: exact_match | token_acc | counterfact."),
        max_new_tokens: int = typer.Option(8, "--max-new-tokens"),
        fluency_tokens: int = typer.Option(32, "--fluency-tokens", help="0 disables fluency."),
        ppl_file: Path | None = typer.Option(None, "--ppl-texts",
                                                help="Text file (one text per line) for perplexity; default: the "
                                                     "testbed filler for testbed models."),
        ppl_n: int = typer.Option(64, "--ppl-n", help="Texts used for perplexity (0 disables)."),
        pre_cache: Path | None = typer.Option(None, "--pre-cache",
                                                 help="Share cached pre-edit measurements across runs."),
        stats_dir: Path | None = typer.Option(None, "--stats-dir",
                                              help="Keep covariance statistics here (default: the kedit cache)."),
        no_cache: bool = typer.Option(False, "--no-cache", help="Keep statistics in memory only."),
        on_error: str = typer.Option("raise", "--on-error",
                                     help="raise | record (a record whose edit or measurement fails is kept as an "
                                          "error record with the reason, and the run goes on)."),
        seed: int = typer.Option(0, "--seed"),
        checkpoints: str | None = typer.Option(None, "--checkpoints",
                                               help="lifelong/v1: numbers of edits to evaluate at, e.g. 10,100,300,"
                                                    "1000 (the last is the stream length; default: those, cut to "
                                                    "the records given)."),
        reedit_rate: float = typer.Option(0.1, "--reedit-rate",
                                          help="lifelong/v1: share of the stream re-editing an earlier fact, "
                                               "[0, 0.5)."),
        locality_probes: int = typer.Option(200, "--locality-probes",
                                            help="lifelong/v1: fixed probe set of untouched facts (0: none)."),
    ) -> None:
        """Evaluate METHOD on MODEL over DATA under PROTOCOL; results go to OUT (resumable)."""
        from kedit.eval.protocols import get_protocol
        from kedit.eval.runner import EvalConfig, RunMismatchError, run_eval
        from kedit.methods.registry import ConfigError, UnknownMethodError
        from kedit.requests import RequestError

        try:
            proto_name = get_protocol(protocol).name
        except ValueError as e:
            fail(str(e))
            return
        if proto_name == "unlearn":  # an unlearning method on a forget split: the same code path as `kedit unlearn`
            from kedit.unlearn.cli import run_unlearn

            run_unlearn(model, method, data, out_dir, sets=sets, eval_size=limit, json_out=json_out, resume=True)
            return
        name = method_name(method, strategy)
        try:
            lifelong = proto_name == "lifelong"
            cps = _parse_checkpoints(checkpoints)
            if cps is not None and not lifelong:
                raise ValueError("--checkpoints is for --protocol lifelong/v1 only")
            cfg = EvalConfig(protocol=protocol, batch_size=batch_size, eval_batch_size=eval_batch_size,
                             max_new_tokens=max_new_tokens, fluency_tokens=fluency_tokens, headline=headline,
                             seed=seed, on_error=on_error, checkpoints=cps, reedit_rate=reedit_rate,
                             locality_probes=locality_probes)
        except ValueError as e:
            fail(str(e))
            return
        overrides = parse_sets(sets)
        validate_method(name, overrides)
        if ppl_file is not None and not ppl_file.is_file():
            fail(f"--ppl-texts {str(ppl_file)!r} not found")
        reqs = resolve_requests(data, limit, fmt, distinct=distinct, whole=whole)
        if per_batch:
            from kedit.data import distinct_per_batch

            reqs = distinct_per_batch(reqs, batch_size)
        facts = targets = None
        if lifelong:
            if cps is not None and cps[-1] > len(reqs):
                fail(f"--checkpoints: the last checkpoint ({cps[-1]}) is more edits than the {len(reqs)} records "
                     f"of {data!r} give")
            if data == "testbed" or data.startswith("testbed:"):
                from kedit.eval.lifelong import testbed_locality_facts, testbed_reedit_targets
                from kedit.testbed import load_world

                world = load_world()
                facts, targets = testbed_locality_facts(world), testbed_reedit_targets(world)
        texts = _ppl_texts(model, ppl_file, ppl_n, heldout=lifelong)
        m, tok = load_or_fail(model, **check_model_available(model))
        try:
            with progress_bars() as bar:
                ctx = edit_context(stats_dir, no_cache, seed=seed, progress=bar)
                run = run_eval(m, tok, reqs, name, method_config=overrides or None, config=cfg,
                               out_dir=out_dir, ctx=ctx, ppl_texts=texts, model_name=model,
                               pre_cache_dir=pre_cache, progress=bar, locality_facts=facts,
                               reedit_targets=targets)
        except (UnknownMethodError, ConfigError, RequestError, RunMismatchError, ValueError) as e:
            where = getattr(e, "kedit_records", None)
            fail(f"{where}: {e}" if where else str(e))
            return
        summary = _summary_json(run.summary)
        if json_out:
            sys.stdout.write(json.dumps(summary) + "\n")
            return
        if "checkpoints" in run.summary:
            st = run.summary["stream"]
            table = Table(title=cell(f"{name} on {model} · {run.summary['protocol']} · k={batch_size} · "
                                     f"T={st['T']} ({st['n_reedits']} re-edits) · {st['locality_probes']} "
                                     "locality probes"))
            table.add_column("edits")
            for col, _ in _LIFELONG_COLUMNS:
                table.add_column(col)
            for c in run.summary["checkpoints"]:
                table.add_row(str(c["n_edits"]), *[_lifelong_cell(k, c["metrics"].get(k)) for _, k in _LIFELONG_COLUMNS])
            out.print(table)
            out.print(cell(f"{run.summary['seconds']}s; results in {out_dir}"))
            return
        table = Table(title=cell(f"{name} on {model} · {run.summary['protocol']} · n={summary['n']}"))
        for col in ("aspect", "metric", "mean [95% CI]", "pre-edit", "n"):
            table.add_column(col)
        from kedit.eval.report import format_cell

        for aspect in _ASPECTS:
            e = run.summary["metrics"][aspect]
            pre = e.get("pre_mean")
            table.add_row(aspect, e["metric"], format_cell(e), "–" if pre is None else f"{pre:.3f}", str(e["n"]))
        ppl = run.summary["metrics"]["capability/perplexity"]
        table.add_row("capability", "capability/perplexity", format_cell(ppl, 2),
                      "–" if ppl.get("pre_mean") is None else f"{ppl['pre_mean']:.2f}", str(ppl["n"]))
        out.print(table)
        line = f"{summary['n']} records in {summary['seconds']}s; results in {out_dir}"
        if summary.get("n_skipped"):
            line += f"; {summary['n_skipped']} skipped (too long for the model's context window)"
        if summary["n_errors"]:
            line += f"; {summary['n_errors']} failed (see errors in summary.json)"
        out.print(cell(line))

    @app.command("report")
    def report_cmd(
        dirs: list[Path] = typer.Argument(..., help="Result directories written by `kedit eval`."),
        report_dir: Path = typer.Option(Path("kedit-report"), "--out", "-o", help="Where report.md and PNGs go."),
        metrics: list[str] = typer.Option([], "--metric", help="Metric columns (default: the headline ones)."),
        plots: bool = typer.Option(True, "--plots/--no-plots", help="Render PNG plots (needs matplotlib)."),
        json_out: bool = typer.Option(False, "--json", help="Print the table as JSON on stdout."),
    ) -> None:
        """Compare result directories: a methods × metrics table (terminal + Markdown) and PNG plots."""
        from kedit.eval.report import PlotsUnavailableError, format_cell, write_report
        from kedit.unlearn.report import is_unlearn_run, write_unlearn_report

        try:
            if dirs and all(is_unlearn_run(d) for d in dirs):  # `kedit unlearn` runs: FQ vs MU scatter
                rep = write_unlearn_report(dirs, report_dir, plots=plots)
                rep["rows"] = [{"label": r["label"], "metrics": {c: {"mean": v} for c, v in r["metrics"].items()}}
                               for r in rep["rows"]]
            else:
                rep = write_report(dirs, report_dir, columns=metrics or None, plots=plots)
        except (FileNotFoundError, ValueError, KeyError) as e:
            fail(str(e))
            return
        except PlotsUnavailableError as e:
            fail(str(e))
            return
        if json_out:
            sys.stdout.write(json.dumps(rep) + "\n")
            return
        table = Table(title="kedit report (mean [95% CI])")
        table.add_column("run", overflow="fold")
        for c in rep["columns"]:
            table.add_column(c, overflow="fold")
        for row in rep["rows"]:
            table.add_row(cell(row["label"]), *[format_cell(row["metrics"][c]) for c in rep["columns"]])
        out.print(table)
        err.print(cell(f"wrote {rep['markdown']}" + (f" and {', '.join(rep['plots'])}" if rep["plots"] else "")))
