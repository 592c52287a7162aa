"""The ``kedit`` command line (Typer + Rich).

``--json`` commands print exactly one JSON object on stdout; progress bars and logs go to stderr.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from kedit import __version__
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
from kedit.eval.cli import register as register_eval
from kedit.finetune.cli import register as register_finetune
from kedit.service.cli import register as register_serve
from kedit.unlearn.cli import register as register_unlearn

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Edit, evaluate and manage LLM knowledge.")
testbed_app = typer.Typer(
    no_args_is_help=True,
    help="The synthetic testbed: `build` a new world and its two models into a directory, `info` shows the "
    "manifest and gate figures of the embedded build or of a build directory.",
)
delta_app = typer.Typer(no_args_is_help=True, help="Inspect, apply and revert saved edit deltas.")
cache_app = typer.Typer(no_args_is_help=True, help="List and remove cached covariance statistics.")
app.add_typer(testbed_app, name="testbed")
app.add_typer(delta_app, name="delta")
app.add_typer(cache_app, name="cache")



def _version(value: bool) -> None:
    if value:
        out.print(f"kedit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level to stderr."),
) -> None:
    logging.basicConfig(  # force: each invocation logs to the stderr it has (tests invoke the app many times)
        level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr, format="%(levelname)s %(message)s",
        force=True,
    )


# kept under their old names: benchmarks and tests import them from here
_fail = fail
_parse_sets = parse_sets
_method_name = method_name


def _load(model: str) -> tuple[Any, Any]:
    return load_or_fail(model, **check_model_available(model))


def methods_table(specs: list[Any], width: int = 200) -> Table:
    """The ``kedit methods`` table (user text shown literally). Below 120 columns the summary, paper and rollback
    share one column, one method per block, so nothing is cut at 80 columns."""
    table = Table(title="kedit methods", show_lines=width < 120)
    table.add_column("method", no_wrap=True)
    if width < 120:
        table.add_column("summary · paper · rollback")
        for s in specs:
            table.add_row(cell(s.name), Text.assemble(s.summary, "\n", (s.paper, "dim"), "\n",
                                                       ("rollback: " + s.rollback, "dim")))
        return table
    table.add_column("summary", min_width=24)
    table.add_column("paper", min_width=16)
    table.add_column("rollback")
    for s in specs:
        table.add_row(cell(s.name), cell(s.summary), cell(s.paper), cell(s.rollback))
    return table


@app.command()
def methods(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List every registered editing method with its paper."""
    from kedit.methods.registry import list_methods

    specs = list_methods()
    if json_out:
        sys.stdout.write(
            json.dumps([{"name": s.name, "paper": s.paper, "summary": s.summary, "mergeable": s.mergeable,
                         "rollback": s.rollback, "batched": s.batched} for s in specs]) + "\n"
        )
        return
    out.print(methods_table(specs, out.width))


def edit_table(title: str, result: Any, limit: int = 20) -> Table:
    """The per-request table of ``kedit edit`` (first ``limit`` requests)."""
    table = Table(title=cell(title))
    table.add_column("#", no_wrap=True, justify="right")
    table.add_column("subject", ratio=2, overflow="fold")
    table.add_column("prompt", ratio=4, overflow="fold")
    table.add_column("target_new", ratio=2, overflow="fold")
    table.add_column("greedy answer", ratio=2, overflow="fold")
    table.add_column("ok", no_wrap=True)
    answers = result.answers or [""] * len(result.requests)
    for i, (r, a, ok) in enumerate(zip(result.requests[:limit], answers[:limit], result.success[:limit])):
        mark = "skipped" if i in result.errors else ("✓" if ok else "✗")
        table.add_row(str(i + 1), cell(r.subject), cell(r.text), cell(r.target_new), cell(a.strip()), mark)
    return table


_SEQUENTIAL_HINT = (
    "{method} edits one request at a time: these {n} requests are applied one after another, and later edits "
    "can undo earlier ones (only about a third of 30 sequential ROME edits survive on the testbed). For many "
    "facts at once use a batch method (--method memit or --method alphaedit), or a memory method (--method "
    "grace), which keeps every edit in a side memory and leaves the weights alone. Success is reported after the "
    "whole sequence, and (--json) right after each request's own edit."
)


@app.command("edit")
def edit_cmd(
    model: str = typer.Option("testbed-gpt2", "--model", "-m", help="testbed-gpt2, testbed-llama, or an HF name/path."),
    method: str = typer.Option("rome", "--method", help="Editing method (see `kedit methods`)."),
    requests: str = typer.Option("testbed:10", "--requests", "-r", help="FILE, testbed[:N] or testbed:A-B (requests A..B-1)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="Force the dataset format of FILE."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Use at most N requests."),
    distinct: bool = typer.Option(False, "--distinct-subjects",
                                  help="Keep only the first request of each subject (conflict-free batches)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, help="Requests per edit batch."),
    strategy: Optional[str] = typer.Option(None, "--strategy", help="e.g. 'blue' for MEMIT/PMET/AlphaEdit."),
    sets: list[str] = typer.Option([], "--set", help="Config override key=value (JSON values), repeatable."),
    save_delta: Optional[Path] = typer.Option(None, "--save-delta", help="Save the delta(s) to this directory."),
    originals: bool = typer.Option(
        True, "--originals/--no-originals", help="Save the original tensors too (exact `kedit delta revert`)."
    ),
    stats_dir: Optional[Path] = typer.Option(
        None, "--stats-dir", help="Keep covariance statistics here (default: the kedit cache, see `kedit cache ls`)."
    ),
    no_cache: bool = typer.Option(False, "--no-cache", help="Keep statistics in memory only (recomputed next run)."),
    on_error: str = typer.Option("raise", "--on-error",
                                 help="raise | record (skip a request that cannot be edited, with the reason)."),
    seed: int = typer.Option(0, "--seed"),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object to stdout."),
) -> None:
    """Edit MODEL with REQUESTS using METHOD and report the success rate."""
    from kedit.api import edit
    from kedit.methods.registry import ConfigError, UnknownMethodError
    from kedit.requests import RequestError

    name = method_name(method, strategy)
    if on_error not in ("raise", "record"):
        fail(f"--on-error must be 'raise' or 'record', got {on_error!r}")
    overrides = parse_sets(sets)
    spec = validate_method(name, overrides)
    reqs = resolve_requests(requests, limit, fmt, distinct=distinct)
    # weight methods that edit one request at a time (a memory method's edits do not interfere: not warned)
    if not spec.batched and spec.mergeable and len(reqs) > 1 and (batch_size is None or batch_size < len(reqs)):
        err.print(cell("warning: " + _SEQUENTIAL_HINT.format(method=spec.name, n=len(reqs))), style="yellow")
    m, tok = _load(model)
    t0 = time.perf_counter()
    try:
        with progress_bars() as bar:
            ctx = edit_context(stats_dir, no_cache, seed=seed, progress=bar)
            result = edit(m, tok, reqs, method=name, config=overrides or None, batch_size=batch_size, ctx=ctx,
                          immediate=True, on_error=on_error)
    except (UnknownMethodError, ConfigError, RequestError, ValueError) as e:
        where = getattr(e, "kedit_records", None)
        fail(f"{where}: {e}" if where else str(e))
        return
    except Exception as e:  # a method failed on a record: name it, keep the traceback for --verbose
        logging.getLogger("kedit.cli").debug("edit failed", exc_info=True)
        where = getattr(e, "kedit_records", None)
        fail(f"{where + ': ' if where else ''}{type(e).__name__}: {e} (use --on-error record to skip it)")
        return
    seconds = time.perf_counter() - t0
    delta_path = None
    if save_delta is not None and result.deltas:
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
        "immediate_success_rate": result.immediate_success_rate,
        "n_errors": len(result.errors),
        "errors": [{"record": i + 1, "case_id": reqs[i].case_id, "error": e} for i, e in sorted(result.errors.items())],
        "rollback_bytes": result.rollback_bytes,
        "seconds": round(seconds, 3),
        "delta": delta_path,
    }
    if json_out:
        sys.stdout.write(json.dumps(summary) + "\n")
        return
    out.print(edit_table(f"{name} on {model}", result))
    line = f"success {summary['success_rate']:.1%} of {len(reqs)} requests after all edits"
    if not spec.batched and len(reqs) > 1:
        line += f" ({result.immediate_success_rate:.1%} right after each request's own edit)"
    if result.errors:
        line += f"; {len(result.errors)} skipped"
    line += f"; {seconds:.1f}s" + (f"; delta saved to {delta_path}" if delta_path else "")
    out.print(cell(line))


#: what `kedit demo` runs by default. Measured with `kedit demo --method M --json` on testbed-gpt2 (reliability /
#: generalization / locality): n=3 MEMIT-BLUE 3/3/3, MEMIT 3/2/1, ROME 3/2/0, r-ROME 3/2/0, AlphaEdit 3/2/0;
#: n=10 MEMIT-BLUE 10/7/7, FT-M 10/6/7, MEMIT 10/5/6, AlphaEdit-BLUE 10/7/4, ROME 7/5/4.
DEMO_METHOD = "memit-blue"


def demo_table(title: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=cell(title))
    table.add_column("#", no_wrap=True, justify="right")
    table.add_column("probe", no_wrap=True)
    table.add_column("prompt", ratio=4, overflow="fold")
    table.add_column("expected", ratio=2, overflow="fold")
    table.add_column("before", ratio=2, overflow="fold")
    table.add_column("after", ratio=2, overflow="fold")
    table.add_column("ok", no_wrap=True)
    for r in rows:
        table.add_row(str(r["request"] + 1), r["kind"], cell(r["prompt"]), cell(r["expected"]), cell(r["before"]),
                      cell(r["after"]), "✓" if r["ok"] else "✗")
    return table


def demo_headline(rows: list[dict[str, Any]]) -> str:
    """Reliability, generalization and locality of the demo together, in words."""
    def count(kind: str) -> tuple[int, int]:
        oks = [r["ok"] for r in rows if r["kind"] == kind]
        return sum(oks), len(oks)

    (rel, n_rel), (gen, n_gen), (loc, n_loc) = count("prompt"), count("paraphrase"), count("neighbour")
    text = f"reliability {rel}/{n_rel} edits took · generalization {gen}/{n_gen} paraphrases"
    if n_loc:
        text += f" · locality {loc}/{n_loc} unrelated neighbours kept their answer"
        if loc < n_loc:
            text += f" -- {n_loc - loc} neighbour answer(s) changed too: this edit was not local"
    return text


@app.command()
def demo(
    model: str = typer.Option("testbed-gpt2", "--model", "-m", help="testbed-gpt2 or testbed-llama."),
    method: str = typer.Option(DEMO_METHOD, "--method"),
    n: int = typer.Option(3, "--n", min=1, help="Number of counterfactual edits."),
    stats_dir: Optional[Path] = typer.Option(None, "--stats-dir", help="Keep covariance statistics here."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Keep statistics in memory only."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object to stdout."),
) -> None:
    """Edit the embedded testbed model offline and show its answers before and after."""
    from kedit.api import TESTBED_MODELS, answers_match, edit, greedy_answers
    from kedit.core.keys import target_ids
    from kedit.testbed import edit_requests, load_world

    if model not in TESTBED_MODELS:
        fail(f"the demo runs on the testbed models ({', '.join(TESTBED_MODELS)}), not {model!r}; "
             "use `kedit edit` for other models")
    validate_method(method, {})
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
        ctx = edit_context(stats_dir, no_cache, progress=bar)
        result = edit(m, tok, reqs, method=method, ctx=ctx, evaluate=False)
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

    def rate(kind: str) -> float | None:
        oks = [r["ok"] for r in rows if r["kind"] == kind]
        return sum(oks) / len(oks) if oks else None

    summary = {
        "method": method,
        "model": model,
        "n_requests": len(reqs),
        "success_rate": rate("prompt"),
        "reliability": rate("prompt"),
        "generalization": rate("paraphrase"),
        "locality": rate("neighbour"),
        "seconds": round(seconds, 3),
        "probes": rows,
    }
    if json_out:
        sys.stdout.write(json.dumps(summary) + "\n")
        return
    out.print(demo_table(f"kedit demo: {method} on {model}", rows))
    out.print(cell(demo_headline(rows)))
    out.print(cell(f"{seconds:.1f}s; the model was restored afterwards."))


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@testbed_app.command("build")
def testbed_build(
    micro: bool = typer.Option(False, "--micro", help="Build the small unit-test world (minutes, see docs/testbed.md)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output directory (default: ./testbed-build)."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    parallel: Optional[bool] = typer.Option(
        None, "--parallel/--sequential",
        help="Train the two models in two processes (default: when at least 2 cores are usable).",
    ),
    width: Optional[int] = typer.Option(
        None, "--width",
        help="Residual width (n_embd / hidden_size; MLP scaled with it) for a width series; default: the recipe's "
        "(160, micro 64).",
    ),
    arch: Optional[list[str]] = typer.Option(
        None, "--arch", help="Build only this architecture (gpt2 or llama; repeatable). Default: both."
    ),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Generate the world, train the tokenizer and both models, check the gates, write a manifest.

    The manifest is written last: a directory without one is an interrupted build, which `load_testbed_model`
    refuses; building into it again starts it over.
    """
    from kedit.testbed import build_testbed
    from kedit.testbed.build import build_testbed_parallel, incomplete_build

    target = out_dir or Path("testbed-build" + ("-micro" if micro else ""))
    if incomplete_build(target):
        err.print(cell(f"{target} holds an interrupted build (no manifest.json): starting it over"), style="yellow")
    kw: dict[str, Any] = {"micro": micro}
    if seed is not None:
        kw["seed"] = seed
    if width is not None:
        kw["width"] = width
    if arch:
        kw["archs"] = tuple(arch)
    from kedit.testbed.train import DEFAULT_SPECS, MICRO_SPECS, widened

    specs = MICRO_SPECS if micro else DEFAULT_SPECS
    for a in kw.get("archs", tuple(specs)):
        if a not in specs:
            fail(f"--arch must be one of {sorted(specs)}, got {a!r}")
        try:
            widened(specs[a], width)
        except ValueError as exc:
            fail(f"--width: {exc}")
    use_parallel = parallel if parallel is not None else _usable_cores() >= 2 and len(kw.get("archs", "ab")) >= 2
    if use_parallel:
        with err.status(f"building {'micro ' if micro else ''}testbed (two models in parallel processes)"):
            manifest = build_testbed_parallel(target, **kw)
    else:
        with progress_bars() as bar:
            manifest = build_testbed(target, progress=lambda done, total: bar("training", done, total), **kw)
    if json_out:
        sys.stdout.write(json.dumps(manifest) + "\n")
    else:
        out.print(testbed_info_table(manifest, str(target)))
        out.print(cell(f"testbed written to {target} in {manifest['build_seconds']['total']:.0f}s"))


def testbed_info_table(manifest: dict[str, Any], where: str) -> Table:
    """Gate figures per model of a build manifest."""
    table = Table(title=cell(f"testbed {where} · generator {manifest.get('generator_version')} · "
                             f"{'micro' if manifest.get('micro') else 'default'} · "
                             f"{'gates passed' if manifest.get('passed') else 'GATES FAILED'}"))
    table.add_column("model", no_wrap=True)
    table.add_column("params", justify="right", no_wrap=True)
    table.add_column("gate", overflow="fold")
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("target", justify="right", no_wrap=True)
    targets = manifest.get("gate_targets") or {}
    for arch, info in sorted((manifest.get("models") or {}).items()):
        gates = info.get("gates") or {}
        first = True
        for gate, value in gates.items():
            if gate == "passed" or isinstance(value, (dict, list)):
                continue
            target = targets.get(gate, "")
            shown = f"{value:.3f}" if isinstance(value, float) else str(value)
            table.add_row(arch if first else "", f"{info.get('params', 0):,}" if first else "", cell(gate), shown,
                          cell(target))
            first = False
    return table


@testbed_app.command("info")
def testbed_info(
    build_dir: Optional[Path] = typer.Argument(None, help="A build directory (default: the embedded testbed)."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Show the manifest of the embedded testbed or of a build directory: versions, sizes, gate figures, and
    whether its files still match the manifest."""
    from kedit.testbed import assets_dir
    from kedit.testbed.build import incomplete_build, verify_manifest

    root = build_dir or assets_dir()
    if incomplete_build(root):
        fail(f"{root} is an interrupted testbed build (no manifest.json); rebuild it with "
             f"`kedit testbed build --out {root}`")
    mpath = root / "manifest.json"
    if not mpath.is_file():
        fail(f"no testbed build at {root} (no manifest.json)")
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
    problems = verify_manifest(root)
    if json_out:
        info = {k: v for k, v in manifest.items() if k != "files"}
        sys.stdout.write(json.dumps({"path": str(root), **info, "n_files": len(manifest.get("files", {})),
                                     "problems": problems}) + "\n")
        return
    out.print(testbed_info_table(manifest, str(root)))
    stats = manifest.get("world_stats") or {}
    out.print(cell(f"world {manifest.get('world_hash', '?')[:12]}: {stats.get('facts', '?')} facts, "
                   f"{stats.get('trained_pairs', '?')} trained pairs, vocabulary {stats.get('vocab_size', '?')}; "
                   f"built in {(manifest.get('build_seconds') or {}).get('total', '?')}s with "
                   f"{', '.join(f'{k} {v}' for k, v in (manifest.get('versions') or {}).items())}"))
    out.print(cell("files match the manifest" if not problems else "problems: " + "; ".join(problems)))


# -- the statistics cache ----------------------------------------------------------------------------------------------
def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _entries(n: int) -> str:
    return f"{n} entry" if n == 1 else f"{n} entries"


@cache_app.command("ls")
def cache_ls(
    directory: Optional[Path] = typer.Option(None, "--dir", help="A statistics directory (default: the kedit cache)."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """List the cached covariance statistics with their size."""
    from kedit.core.stats import StatsCache, default_stats_dir

    root = directory or default_stats_dir()
    entries = StatsCache(root).entries()
    total = sum(e["bytes"] for e in entries)
    if json_out:
        sys.stdout.write(json.dumps({"directory": str(root), "entries": entries, "bytes": total}) + "\n")
        return
    table = Table(title=cell(f"statistics cache {root}"))
    table.add_column("key", no_wrap=True)
    table.add_column("model", no_wrap=True)
    table.add_column("layer", overflow="fold")
    table.add_column("tokens", justify="right", no_wrap=True)
    table.add_column("corpus", overflow="fold")
    table.add_column("size", justify="right", no_wrap=True)
    for e in entries:
        table.add_row(e["key"][:12], cell((e.get("model_key") or "?")[:12]), cell(e.get("module") or e.get("layer")),
                      cell(e.get("n_tokens")), cell((e.get("corpus") or "")[:24]), _size(e["bytes"]))
    out.print(table)
    out.print(cell(f"{_entries(len(entries))}, {_size(total)} in {root}"))


@cache_app.command("rm")
def cache_rm(
    keys: list[str] = typer.Argument(None, help="Entry keys (or unique prefixes) as `kedit cache ls` shows them."),
    all_entries: bool = typer.Option(False, "--all", help="Remove every entry."),
    directory: Optional[Path] = typer.Option(None, "--dir", help="A statistics directory (default: the kedit cache)."),
) -> None:
    """Remove cached statistics (named entries, or --all)."""
    from kedit.core.stats import StatsCache, default_stats_dir

    if not keys and not all_entries:
        fail("name the entries to remove (see `kedit cache ls`) or pass --all")
    cache = StatsCache(directory or default_stats_dir())
    try:
        removed = cache.remove(None if all_entries else keys)
    except KeyError as e:
        fail(str(e.args[0]))
        return
    out.print(cell(f"removed {_entries(len(removed))} ({_size(sum(e['bytes'] for e in removed))})"))


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
    """Kept for callers of older versions: the eval commands are registered when this module is imported."""
    register_eval(app)


# sub-command groups that live next to their feature (`kedit eval`, `kedit report`); they import the shared helpers
# from kedit.cli_common, never this module, so there is no import cycle
register_eval(app)
register_serve(app)
register_unlearn(app)
register_finetune(app)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
