"""Efficacy table: method × testbed model × protocol → reliability, generalization, locality (with 95 % CIs).

Every cell is one :func:`kedit.eval.run_eval` run written to ``--out/<model>/<protocol>-k<K>/<method>`` (resumable:
a rerun only evaluates what is missing), so ``kedit report`` can render any subset of them afterwards.

    python benchmarks/efficacy.py                                    # batch 1 (single/v1), every registered method, 50 requests
    python benchmarks/efficacy.py --methods memit alphaedit --protocol batch/v1 --batch-size 200 \
        --data testbed:400-1564 --distinct-subjects --limit 200
    python benchmarks/efficacy.py --protocol sequential-final/v1 --batch-size 50 --data testbed:100-600
    python benchmarks/efficacy.py --json                             # one JSON object on stdout
    python benchmarks/efficacy.py --data testbed:1500-1550           # the frozen final-report slice (docs/testbed.md)
    python benchmarks/efficacy.py --settings paper                   # the papers' v* optimiser beside the tuned one

Requests default to ``testbed:100-150``: the 50 requests after the first 100, which the testbed presets were NOT
tuned on (tuning used ``testbed:20``). Headline definitions are the strict ones (exact match of the greedy
continuation; locality = neighbourhood continuation unchanged from the pre-edit model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ASPECTS = ("reliability", "generalization", "locality")
#: the target optimiser's knobs that do not scale with the model (layers and λ do, so they stay the testbed's)
PAPER_KNOBS = ("clamp_norm_factor", "kl_factor", "v_weight_decay", "v_steps", "v_lr", "nll_loss_factor")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["testbed-gpt2", "testbed-llama"])
    ap.add_argument("--methods", nargs="+", default=None,
                    help="default: every method kedit registers (kedit.methods.registry.list_methods())")
    ap.add_argument("--protocol", default="single/v1")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--data", default="testbed:100-150", help="testbed[:N], testbed:A-B or a dataset file")
    ap.add_argument("--limit", type=int, default=None,
                    help="use at most N requests (after --distinct-subjects / the --distinct-per-batch order)")
    ap.add_argument("--distinct-subjects", action="store_true",
                    help="keep the first request of each subject (conflict-free batches, MEMIT's mass-editing setup)")
    ap.add_argument("--distinct-per-batch", action="store_true",
                    help="reorder (keeping every request) so each batch of k has distinct subjects where possible")
    ap.add_argument("--out", default="results/efficacy")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--fluency-tokens", type=int, default=0, help="0 (default) skips fluency generation")
    ap.add_argument("--settings", choices=("preset", "paper"), default="preset",
                    help="preset: the testbed presets (tuned); paper: the same presets with the scale-free knobs of "
                         f"the target optimiser ({', '.join(PAPER_KNOBS)}) taken from what kedit uses for GPT-J-6B, "
                         "the model every locate-then-edit paper's code covers; methods without a v* optimiser are "
                         "skipped")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from kedit.api import load_model
    from kedit.cli import resolve_requests
    from kedit.core.context import EditContext
    from kedit.eval.cli import _ppl_texts
    from kedit.eval.runner import EvalConfig, run_eval

    if args.methods is None:
        args.methods = registered_methods()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.distinct_per_batch:  # reorder the whole set first, so --limit N is a prefix of the full sequence
        from kedit.data import distinct_per_batch

        requests = resolve_requests(args.data, None, distinct=args.distinct_subjects)
        requests = distinct_per_batch(requests, args.batch_size)[: args.limit]
    else:
        requests = resolve_requests(args.data, args.limit, distinct=args.distinct_subjects)
    # runs on other request sets go to their own directories (the default set keeps the plain name)
    tag = "" if (args.data == "testbed:100-150" and not args.distinct_subjects and not args.distinct_per_batch
                 and args.limit is None) else (
        "-" + Path(args.data).name.replace(":", "_") + ("-distinct" if args.distinct_subjects else "")
        + ("-perbatch" if args.distinct_per_batch else "")
        + (f"-n{args.limit}" if args.limit is not None else ""))
    if args.settings == "paper":
        tag += "-paper"
    cells = []
    for model_name in args.models:
        model, tok = load_model(model_name)
        ctx = EditContext()  # statistics shared by the methods on this model
        ppl = _ppl_texts(model_name, None, 64)
        for method in args.methods:
            overrides = paper_overrides(method) if args.settings == "paper" else {}
            if overrides is None:
                continue
            out = Path(args.out) / model_name / f"{args.protocol.replace('/', '-')}-k{args.batch_size}{tag}" / method
            cfg = EvalConfig(protocol=args.protocol, batch_size=args.batch_size, fluency_tokens=args.fluency_tokens)
            t = time.perf_counter()
            run = run_eval(model, tok, requests, method, method_config=overrides or None, config=cfg, out_dir=out, ctx=ctx, ppl_texts=ppl,
                           model_name=model_name, pre_cache_dir=Path(args.out) / model_name / "pre")
            m = run.summary["metrics"]
            cell = {"model": model_name, "method": method, "settings": args.settings, "protocol": args.protocol, "batch_size": args.batch_size,
                    "n": run.summary["n_evaluated"], "seconds": round(time.perf_counter() - t, 1), "out": str(out)}
            for a in ASPECTS:
                cell[a] = m.get(a, {}).get("mean")
                cell[a + "_ci95"] = m.get(a, {}).get("ci95")
            cells.append(cell)
            print(_row(cell), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"cells": cells}))
    else:
        print(f"\n{'model':15} {'method':15} {'k':>5} {'n':>4}  " + "  ".join(f"{a:>14}" for a in ASPECTS) + "   sec")
        for c in cells:
            print(_row(c))
    return 0


def registered_methods() -> list[str]:
    """Every editing method kedit ships, from the registry (a new method joins the table by registering)."""
    from kedit.methods.registry import list_methods

    return [s.name for s in list_methods() if s.compute.__module__.startswith("kedit.methods")]


def paper_overrides(method: str) -> dict | None:
    """``{knob: value}`` of the papers' target optimiser for ``method`` (``None``: it has none).

    The values are those of ``method``'s config for GPT-J-6B (dataclass defaults overlaid with its GPT-J preset,
    i.e. what ``kedit edit --model EleutherAI/gpt-j-6b`` would use); only :data:`PAPER_KNOBS` are taken, so the
    layers, λ and statistics stay the testbed preset's.
    """
    import dataclasses

    from transformers import GPTJConfig

    from kedit.methods.registry import get_method

    spec = get_method(method)
    fields = {f.name for f in dataclasses.fields(spec.config)}
    if "clamp_norm_factor" not in fields:
        return None
    gptj = GPTJConfig(n_layer=28, n_embd=4096, n_head=16, vocab_size=50400, rotary_dim=64, n_positions=2048)
    paper = spec.default_config(gptj)
    return {k: getattr(paper, k) for k in PAPER_KNOBS if k in fields}


def _row(c: dict) -> str:
    vals = "  ".join(f"{c[a]:>14.1%}" if c[a] is not None else f"{'n/a':>14}" for a in ASPECTS)
    name = c["method"] + (" (paper)" if c.get("settings") == "paper" else "")
    return f"{c['model']:15} {name:15} {c['batch_size']:>5} {c['n']:>4}  {vals}  {c['seconds']:>5}"


if __name__ == "__main__":
    raise SystemExit(main())
