"""Editing speed: wall time and peak RSS per method × model × batch size, plus the batched-vs-sequential
target-optimisation speedup measured in the same run.

    python benchmarks/edit_speed.py                                   # default grid (batches 1, 10, 100)
    python benchmarks/edit_speed.py --batches 1 10 100 1000 --methods memit alphaedit --json out.json

Each (method, model, batch) cell runs in a fresh subprocess so its peak RSS is its own (``os.wait4``). Statistics
are computed once per cell and included in the time (a real first edit pays for them too); the ratio block
isolates the target optimiser, the part kedit batches and the reference code runs one request at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

DEFAULT_METHODS = ["rome", "memit", "pmet", "alphaedit", "emmet", "ft-m", "lora", "kn"]


def run_cell(method: str, model: str, batch: int, threads: int) -> dict:
    """Child process body: one edit of ``batch`` requests, timed."""
    import torch

    torch.set_num_threads(threads)
    from kedit.api import edit, load_model
    from kedit.core.context import EditContext
    from kedit.testbed import edit_requests, load_world

    m, tok = load_model(model)
    reqs = edit_requests(load_world(), n=batch)
    t0 = time.perf_counter()
    result = edit(m, tok, reqs, method=method, ctx=EditContext(), evaluate=False, batch_size=batch)
    seconds = time.perf_counter() - t0
    return {"method": method, "model": model, "batch": batch, "seconds": round(seconds, 3),
            "compute_s": round(result.timings["compute_s"], 3)}


def target_ratio(model: str, n: int, threads: int) -> dict:
    """Batched target optimisation of ``n`` requests vs the same requests one at a time."""
    import torch

    torch.set_num_threads(threads)
    from kedit.api import load_model
    from kedit.arch import get_adapter
    from kedit.core.context import EditContext
    from kedit.core.targets import Site, TargetConfig, optimize_targets
    from kedit.testbed import edit_requests, load_world

    m, tok = load_model(model)
    adapter = get_adapter(m)
    reqs = edit_requests(load_world(), n=n)
    templates = EditContext().context_templates(m, tok, ((10, 5),))
    site = [Site("block", adapter.num_layers(m) // 3)]
    cfg = TargetConfig(steps=20)
    t0 = time.perf_counter()
    batched = optimize_targets(m, tok, adapter, reqs, site, cfg, templates)
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = [optimize_targets(m, tok, adapter, [r], site, cfg, templates) for r in reqs]
    t_single = time.perf_counter() - t0
    diff = max(float((batched.delta[site[0]][i] - s.delta[site[0]][0]).abs().max()) for i, s in enumerate(single))
    return {"model": model, "n": n, "batched_s": round(t_batched, 3), "sequential_s": round(t_single, 3),
            "speedup": round(t_single / t_batched, 2), "max_abs_diff": diff}


def _child(args: list[str]) -> tuple[dict | None, float, str]:
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    out = proc.stdout.read().decode() if proc.stdout else ""
    err = proc.stderr.read().decode() if proc.stderr else ""
    rss_mb = usage.ru_maxrss / 1024
    if status != 0:
        return None, rss_mb, err.strip().splitlines()[-1] if err.strip() else f"exit {status}"
    return json.loads(out.strip().splitlines()[-1]), rss_mb, ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", default=DEFAULT_METHODS)
    p.add_argument("--models", nargs="*", default=["testbed-gpt2", "testbed-llama"])
    p.add_argument("--batches", nargs="*", type=int, default=[1, 10, 100])
    p.add_argument("--ratio-n", type=int, default=32, help="requests in the batched-vs-sequential comparison")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", dest="json_path", default=None, help="also write the results here")
    p.add_argument("--_cell", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--_ratio", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._cell:
        sys.stdout.write(json.dumps(run_cell(a._cell[0], a._cell[1], int(a._cell[2]), a.threads)) + "\n")
        return
    if a._ratio:
        sys.stdout.write(json.dumps(target_ratio(a._ratio[0], int(a._ratio[1]), a.threads)) + "\n")
        return

    rows, ratios = [], []
    print(f"{'method':<12} {'model':<14} {'batch':>6} {'seconds':>9} {'s/edit':>8} {'peak RSS MB':>12}")
    for model in a.models:
        for method in a.methods:
            for batch in a.batches:
                res, rss, error = _child(["--threads", str(a.threads), "--_cell", method, model, str(batch)])
                row = {"method": method, "model": model, "batch": batch, "peak_rss_mb": round(rss, 1)}
                if res is None:
                    row["error"] = error
                    print(f"{method:<12} {model:<14} {batch:>6}  failed: {error}")
                else:
                    row.update(res)
                    print(f"{method:<12} {model:<14} {batch:>6} {res['seconds']:>9.2f} "
                          f"{res['seconds'] / batch:>8.3f} {rss:>12.0f}")
                rows.append(row)
        res, _, error = _child(["--threads", str(a.threads), "--_ratio", model, str(a.ratio_n)])
        if res is not None:
            ratios.append(res)
            print(f"target optimisation on {model}, {a.ratio_n} requests: batched {res['batched_s']:.2f}s vs "
                  f"one-by-one {res['sequential_s']:.2f}s -> speedup {res['speedup']:.2f}x "
                  f"(max |Δδ| {res['max_abs_diff']:.2e})")
        else:
            print(f"target ratio on {model} failed: {error}")
    out = {"cells": rows, "target_optimisation": ratios}
    if a.json_path:
        with open(a.json_path, "w") as fh:
            json.dump(out, fh, indent=2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
