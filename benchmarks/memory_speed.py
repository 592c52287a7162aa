"""Generation with live memory edits vs the unedited model (issue #12's speed target: greedy generation with 1,000
live GRACE edits ≤ 1.05 × the unedited time, WISE ≤ 1.15 ×).

    python benchmarks/memory_speed.py --threads 1                       # GRACE 1,000 edits, WISE 100, testbed-gpt2
    python benchmarks/memory_speed.py --methods grace --edits 1000 --models testbed-gpt2 testbed-llama

For each method: make ``--edits`` real edits of distinct testbed requests one after another (each a memory entry;
the weights are untouched), then time ``kedit.api.greedy_answers`` on ``--prompts`` prompts (half edited prompts,
half unrelated ones, batched as the evaluation does) with the memory live and after reverting every edit, in the same
process, alternating, fastest of ``--repeats``. Prints the ratio edited / unedited per (model, method).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def measure(model_name: str, method: str, n_edits: int, n_prompts: int, repeats: int) -> dict:
    import kedit
    from kedit.api import greedy_answers
    from kedit.testbed import edit_requests, load_world

    model, tok = kedit.load_model(model_name)
    reqs = edit_requests(load_world())
    edits, others = reqs[:n_edits], reqs[n_edits:]
    t0 = time.perf_counter()
    result = kedit.edit(model, tok, edits, method=method)
    edit_s = time.perf_counter() - t0
    half = n_prompts // 2
    prompts = [r.text for r in edits[:half]] + [r.text for r in others[: n_prompts - half]]

    def timed() -> float:
        t = time.perf_counter()
        greedy_answers(model, tok, prompts, max_new_tokens=8)
        return time.perf_counter() - t

    live, base = [], []
    try:
        for _ in range(repeats):
            live.append(timed())
            for d in reversed(result.deltas):  # off, timed, back on: the same process, alternating
                d.revert(model)
            base.append(timed())
            for d in result.deltas:
                d.apply(model)
    finally:
        result.revert(model)
    return {"model": model_name, "method": method, "edits": n_edits, "prompts": n_prompts,
            "edit_s": round(edit_s, 1), "live_s": round(min(live), 3), "unedited_s": round(min(base), 3),
            "ratio": round(min(live) / min(base), 3), "success_rate": result.success_rate}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["testbed-gpt2"])
    ap.add_argument("--methods", nargs="+", default=["grace", "wise"])
    ap.add_argument("--edits", type=int, nargs="+", default=None,
                    help="edits per method, in --methods order (default: GRACE 1000, WISE 100)")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    defaults = {"grace": 1000, "wise": 100}
    edits = a.edits or [defaults.get(m, 100) for m in a.methods]
    if len(edits) == 1:
        edits = edits * len(a.methods)
    cells = []
    for model in a.models:
        for method, n in zip(a.methods, edits):
            c = measure(model, method, n, a.prompts, a.repeats)
            cells.append(c)
            print(f"{model:14} {method:6} {n:>5} live edits: generation {c['live_s']:.2f}s vs unedited "
                  f"{c['unedited_s']:.2f}s -> ratio {c['ratio']:.3f} (edits took {c['edit_s']}s, "
                  f"success {c['success_rate']:.1%})", flush=True)
    if a.json:
        print(json.dumps({"cells": cells}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
