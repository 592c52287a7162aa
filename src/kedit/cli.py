"""The ``kedit`` command line (Typer + Rich).

``--json`` commands print exactly one JSON object on stdout; progress bars and logs go to stderr.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from kedit import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Edit, evaluate and manage LLM knowledge.")
testbed_app = typer.Typer(no_args_is_help=True, help="Build and inspect the synthetic testbed.")
delta_app = typer.Typer(no_args_is_help=True, help="Inspect, apply and revert saved edit deltas.")
app.add_typer(testbed_app, name="testbed")
app.add_typer(delta_app, name="delta")

err = Console(stderr=True)
out = Console()


def _version(value: bool) -> None:
    if value:
        out.print(f"kedit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level to stderr."),
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr, format="%(levelname)s %(message)s"
    )


@contextlib.contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Any]:
    """A ``fn(stage, done, total)`` drawing one Rich bar per stage on stderr."""
    if not enabled:
        yield None
        return
    prog = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )
    tasks: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = prog.add_task(stage, total=total)
        prog.update(tasks[stage], completed=done, total=total)

    with prog:
        yield update


def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}", soft_wrap=True)
    raise typer.Exit(2)


def _load(model: str) -> tuple[Any, Any]:
    from kedit.api import load_model

    try:
        with err.status(f"loading {model}"):
            return load_model(model)
    except OSError as e:
        _fail(f"cannot load model {model!r}: {e}")
        raise


def resolve_requests(
    spec: str, limit: int | None = None, fmt: str | None = None, *, distinct: bool = False
) -> list[Any]:
    """``testbed``, ``testbed:N`` (the first N), ``testbed:A-B`` (requests A..B-1, e.g. a held-out slice) -- the
    testbed's counterfactual requests -- or a dataset file in any supported format.

    With ``distinct``, only the first request of each subject is kept (:func:`kedit.data.distinct_subjects`,
    the mass-editing protocol of MEMIT), and ``limit`` counts the kept ones.
    """
    if spec == "testbed" or spec.startswith("testbed:"):
        from kedit.testbed import edit_requests, load_world

        start, stop = _testbed_slice(spec)
        reqs = edit_requests(load_world(), n=stop)
        reqs = reqs[start:stop]
    else:
        from kedit.data import load_requests

        path = Path(spec)
        if not path.exists():
            _fail(f"requests file {spec!r} not found (or use testbed[:N] / testbed:A-B)")
        reqs = load_requests(path, format=fmt, limit=None if distinct else limit)
    if distinct:
        from kedit.data import distinct_subjects

        try:
            reqs = distinct_subjects(reqs, limit=limit)
        except ValueError as e:
            _fail(str(e))
    elif limit is not None:
        reqs = reqs[:limit]
    return reqs


def _testbed_slice(spec: str) -> tuple[int, int | None]:
    arg = spec.split(":", 1)[1] if ":" in spec else ""
    try:
        if not arg:
            return 0, None
        if "-" in arg:
            a, b = (int(x) for x in arg.split("-", 1))
        else:
            a, b = 0, int(arg)
    except ValueError:
        _fail(f"bad testbed spec {spec!r}: use testbed, testbed:N or testbed:A-B")
    if a < 0 or b <= a:
        _fail(f"bad testbed spec {spec!r}: need 0 <= A < B")
    return a, b


def _parse_sets(sets: list[str]) -> dict[str, Any]:
    cfg: dict[str, Any] = {}
    for item in sets:
        if "=" not in item:
            _fail(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            cfg[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            cfg[k.strip()] = v
    return cfg


def _method_name(method: str, strategy: str | None) -> str:
    if strategy in (None, "", "spread", "default"):
        return method
    return f"{method}-{strategy}"


@app.command()
def methods(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List every registered editing method with its paper."""
    from kedit.methods.registry import list_methods

    specs = list_methods()
    if json_out:
        out.print_json(
            json.dumps([{"name": s.name, "paper": s.paper, "summary": s.summary, "mergeable": s.mergeable,
                         "rollback": s.rollback} for s in specs])
        )
        return
    table = Table(title="kedit methods")
    for col in ("method", "summary", "paper", "rollback"):
        table.add_column(col)
    for s in specs:
        table.add_row(s.name, s.summary, s.paper, s.rollback)
    out.print(table)


@app.command("edit")
def edit_cmd(
    model: str = typer.Option("testbed-gpt2", "--model", "-m", help="testbed-gpt2, testbed-llama, or an HF name/path."),
    method: str = typer.Option("rome", "--method", help="Editing method (see `kedit methods`)."),
    requests: str = typer.Option("testbed:10", "--requests", "-r", help="FILE, testbed[:N] or testbed:A-B (requests A..B-1)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="Force the dataset format of FILE."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use at most N requests."),
    distinct: bool = typer.Option(False, "--distinct-subjects",
                                  help="Keep only the first request of each subject (conflict-free batches)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Requests per edit batch."),
    strategy: Optional[str] = typer.Option(None, "--strategy", help="e.g. 'blue' for MEMIT/PMET/AlphaEdit."),
    sets: list[str] = typer.Option([], "--set", help="Config override key=value (JSON values), repeatable."),
    save_delta: Optional[Path] = typer.Option(None, "--save-delta", help="Save the delta(s) to this directory."),
    originals: bool = typer.Option(
        True, "--originals/--no-originals", help="Save the original tensors too (exact `kedit delta revert`)."
    ),
    stats_dir: Optional[Path] = typer.Option(None, "--stats-dir", help="Persist covariance statistics here."),
    seed: int = typer.Option(0, "--seed"),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object to stdout."),
) -> None:
    """Edit MODEL with REQUESTS using METHOD and report the success rate."""
    from kedit.api import edit
    from kedit.core.context import EditContext
    from kedit.methods.registry import ConfigError, UnknownMethodError
    from kedit.requests import RequestError

    name = _method_name(method, strategy)
    try:
        reqs = resolve_requests(requests, limit, fmt, distinct=distinct)
        m, tok = _load(model)
        t0 = time.perf_counter()
        with progress_bars() as bar:
            ctx = EditContext.with_cache_dir(stats_dir, seed=seed, progress=bar) if stats_dir else EditContext(
                seed=seed, progress=bar
            )
            result = edit(m, tok, reqs, method=name, config=_parse_sets(sets) or None, batch_size=batch_size, ctx=ctx)
        seconds = time.perf_counter() - t0
    except (UnknownMethodError, ConfigError, RequestError, ValueError) as e:
        _fail(str(e))
        return
    delta_path = None
    if save_delta is not None:
        if len(result.deltas) == 1:
            result.deltas[0].save(save_delta, include_originals=originals)
        else:
            for i, d in enumerate(result.deltas):
                d.save(save_delta / f"{i:04d}", include_originals=originals)
        delta_path = str(save_delta)
    summary = {
        "method": name,
        "model": model,
        "n_requests": len(reqs),
        "success_rate": result.success_rate,
        "seconds": round(seconds, 3),
        "delta": delta_path,
    }
    if json_out:
        sys.stdout.write(json.dumps(summary) + "\n")
        return
    table = Table(title=f"{name} on {model}")
    for col in ("subject", "prompt", "target_new", "greedy answer", "ok"):
        table.add_column(col)
    for r, a, ok in zip(result.requests[:20], result.answers[:20], result.success[:20]):
        table.add_row(r.subject, r.text, r.target_new, a.strip(), "✓" if ok else "✗")
    out.print(table)
    out.print(
        f"success {summary['success_rate']:.1%} of {len(reqs)} requests in {seconds:.1f}s"
        + (f"; delta saved to {delta_path}" if delta_path else "")
    )


@app.command()
def demo(
    model: str = typer.Option("testbed-gpt2", "--model", "-m", help="testbed-gpt2 or testbed-llama."),
    method: str = typer.Option("rome", "--method"),
    n: int = typer.Option(3, "--n", help="Number of counterfactual edits."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object to stdout."),
) -> None:
    """Edit the embedded testbed model offline and show its answers before and after."""
    from kedit.api import answers_match, edit, greedy_answers
    from kedit.core.context import EditContext
    from kedit.core.keys import target_ids
    from kedit.testbed import edit_requests, load_world

    m, tok = _load(model)
    reqs = edit_requests(load_world(), n=n)
    probes: list[tuple[int, str, str, str]] = []  # (request, kind, prompt, expected)
    for i, r in enumerate(reqs):
        probes.append((i, "prompt", r.text, r.target_new))
        if r.paraphrases:
            probes.append((i, "paraphrase", r.paraphrases[0], r.target_new))
        if r.neighborhood:
            nb = r.neighborhood[0]
            probes.append((i, "neighbour", nb.prompt, nb.answer or ""))
    prompts = [p[2] for p in probes]
    width = max(len(target_ids(tok, p[3])) for p in probes if p[3]) + 2
    t0 = time.perf_counter()
    before = greedy_answers(m, tok, prompts, max_new_tokens=width)
    with progress_bars(not json_out) as bar:
        result = edit(m, tok, reqs, method=method, ctx=EditContext(progress=bar), evaluate=False)
    after = greedy_answers(m, tok, prompts, max_new_tokens=width)
    seconds = time.perf_counter() - t0
    rows = [
        {
            "request": i,
            "kind": kind,
            "prompt": p,
            "expected": exp,
            "before": b.strip(),
            "after": a.strip(),
            "ok": answers_match(a, exp),
        }
        for (i, kind, p, exp), b, a in zip(probes, before, after)
    ]
    result.revert(m)
    success = [r["ok"] for r in rows if r["kind"] == "prompt"]
    summary = {
        "method": method,
        "model": model,
        "n_requests": len(reqs),
        "success_rate": sum(success) / len(success),
        "seconds": round(seconds, 3),
        "probes": rows,
    }
    if json_out:
        sys.stdout.write(json.dumps(summary) + "\n")
        return
    table = Table(title=f"kedit demo: {method} on {model}")
    for col in ("#", "probe", "prompt", "expected", "before", "after", "ok"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(str(r["request"]), r["kind"], r["prompt"], r["expected"], r["before"], r["after"],
                      "✓" if r["ok"] else "✗")
    out.print(table)
    out.print(f"{sum(success)}/{len(success)} edits took in {seconds:.1f}s (the model was restored afterwards).")


@testbed_app.command("build")
def testbed_build(
    micro: bool = typer.Option(False, "--micro", help="Build the small unit-test world (≤ 60 s)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output directory (default: ./testbed-build)."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Generate the world, train the tokenizer and both models, check the gates, write a manifest."""
    from kedit.testbed import build_testbed

    target = out_dir or Path("testbed-build" + ("-micro" if micro else ""))
    kw: dict[str, Any] = {"micro": micro}
    if seed is not None:
        kw["seed"] = seed
    with progress_bars() as bar:
        manifest = build_testbed(target, progress=lambda done, total: bar("training", done, total), **kw)
    if json_out:
        sys.stdout.write(json.dumps(manifest) + "\n")
    else:
        out.print_json(json.dumps(manifest))
        out.print(f"testbed written to {target}")


@delta_app.command("inspect")
def delta_inspect(path: Path, json_out: bool = typer.Option(False, "--json")) -> None:
    """Show what a saved delta changes."""
    from kedit.deltas import DeltaError, load_delta

    try:
        d = load_delta(path)
    except (DeltaError, OSError) as e:
        _fail(str(e))
        return
    summary = d.summary()
    if json_out:
        sys.stdout.write(json.dumps(summary, default=str) + "\n")
        return
    out.print_json(json.dumps(summary, default=str))


def _apply_or_revert(path: Path, model: str, out_dir: Path, revert: bool) -> dict[str, Any]:
    from kedit.deltas import DeltaError, load_delta

    m, tok = _load(model)
    try:
        d = load_delta(path)
        if revert:
            d.revert_saved(m)
        else:
            d.apply(m)
    except DeltaError as e:
        _fail(str(e))
    out_dir.mkdir(parents=True, exist_ok=True)
    m.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return {"delta": str(path), "model": model, "out": str(out_dir), "reverted" if revert else "applied": True}


@delta_app.command("apply")
def delta_apply(
    path: Path,
    model: str = typer.Option(..., "--model", "-m"),
    out_dir: Path = typer.Option(..., "--out", help="Where to save the edited checkpoint."),
) -> None:
    """Apply a saved delta to MODEL and save the edited checkpoint (refused if MODEL is not the delta's base)."""
    sys.stdout.write(json.dumps(_apply_or_revert(path, model, out_dir, revert=False)) + "\n")


@delta_app.command("revert")
def delta_revert(
    path: Path,
    model: str = typer.Option(..., "--model", "-m", help="An edited checkpoint that has this delta applied."),
    out_dir: Path = typer.Option(..., "--out", help="Where to save the restored checkpoint."),
) -> None:
    """Remove a saved delta from an edited checkpoint (verified against the base fingerprints)."""
    sys.stdout.write(json.dumps(_apply_or_revert(path, model, out_dir, revert=True)) + "\n")


def _register_extensions() -> None:
    # sub-command groups that live next to their feature (e.g. `kedit eval`, `kedit report`)
    from kedit.eval.cli import register

    register(app)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _register_extensions()
    app()


if __name__ == "__main__":
    main()
