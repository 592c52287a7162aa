"""Generation with live memory edits vs the unedited model (issue #12's speed target: greedy generation with 1,000
live GRACE edits ≤ 1.05 × the unedited time, WISE ≤ 1.15 ×).

    python benchmarks/memory_speed.py --threads 1                       # GRACE 1,000 edits, WISE 100, testbed-gpt2
    python benchmarks/memory_speed.py --methods grace --edits 1000 --models testbed-gpt2 testbed-llama
    python benchmarks/memory_speed.py --threads 1 --grace-widths 160 320 640 1024   # the look-up cost vs width

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


def measure_width(width: int, n_edits: int, n_prompts: int, repeats: int, layers: int = 6) -> dict:
    """GRACE's look-up cost against the model's own cost as the model widens: a random GPT-2 ``width`` wide
    (``layers`` layers, MLP 4 × width, 40-wide heads, the testbed tokenizer) with ``n_edits`` codebook entries
    whose keys are the model's own layer inputs at the last token of ``n_edits`` distinct testbed prompts (values
    random, span 2, radius a tenth of the median key norm: each edited prompt hits its own entry), at the testbed
    GPT-2 preset's layer. The same generation as :func:`measure` (half edited prompts), memory live vs removed,
    fastest of ``repeats``. The values are not trained: the look-up does the same work whatever they hold."""
    import torch

    import kedit
    from kedit.api import greedy_answers
    from kedit.arch import get_adapter
    from kedit.deltas import EditDelta, MemoryEntryUpdate
    from kedit.testbed import edit_requests, load_world
    from kedit.testing import tiny_model

    base, tok = kedit.load_model("testbed-gpt2")
    m = tiny_model("gpt2", vocab_size=base.config.vocab_size, n_embd=width, n_inner=4 * width, n_layer=layers,
                   n_head=max(1, width // 40), n_positions=base.config.n_positions)
    layer = 3 * layers // 6
    adapter = get_adapter(m)
    path, module = adapter.path("mlp_out", layer), adapter.module(m, "mlp_out", layer)
    reqs = edit_requests(load_world())
    edits, others = reqs[:n_edits], reqs[n_edits:]
    keys = []
    h = module.register_forward_hook(lambda mod, a, o: keys.append(a[0][0, -1].detach().clone()))
    try:
        with torch.no_grad():
            for r in edits:
                m(input_ids=torch.tensor([tok(r.text)["input_ids"]]))
    finally:
        h.remove()
    eps = 0.1 * float(torch.stack(keys).norm(dim=1).median())
    g = torch.Generator().manual_seed(0)
    updates = [MemoryEntryUpdate(f"{path}#grace:w{i}", k, torch.randn(width, generator=g),
                                 {"edit_id": f"w{i}", "module": path, "label": f"l{i}", "epsilon": eps,
                                  "method": "grace", "span": 2}) for i, k in enumerate(keys)]
    delta = EditDelta.for_model(m, updates, method="grace", config={}, requests=edits)
    half = n_prompts // 2
    prompts = [r.text for r in edits[:half]] + [r.text for r in others[: n_prompts - half]]

    def timed() -> float:
        t = time.perf_counter()
        greedy_answers(m, tok, prompts, max_new_tokens=8)
        return time.perf_counter() - t

    live, bare = [], []
    timed()  # warm-up
    for _ in range(repeats):
        delta.apply(m)
        live.append(timed())
        delta.revert(m)
        bare.append(timed())
    n_params = sum(p.numel() for p in m.parameters())
    return {"width": width, "layers": layers, "params": n_params, "edits": n_edits, "key_dim": 4 * width,
            "live_s": round(min(live), 3), "unedited_s": round(min(bare), 3),
            "ratio": round(min(live) / min(bare), 3)}


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
    ap.add_argument("--grace-widths", type=int, nargs="*", default=[],
                    help="instead: GRACE's look-up cost on random GPT-2s of these widths (measure_width)")
    ap.add_argument("--layers", type=int, default=6, help="layers of the --grace-widths models")
    a = ap.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    defaults = {"grace": 1000, "wise": 100}
    edits = a.edits or [defaults.get(m, 100) for m in a.methods]
    if len(edits) == 1:
        edits = edits * len(a.methods)
    cells = []
    if a.grace_widths:
        n = (a.edits or [1000])[0]
        for w in a.grace_widths:
            c = measure_width(w, n, a.prompts, a.repeats, a.layers)
            cells.append(c)
            print(f"width {w:5} ({c['params'] / 1e6:6.1f} M params, {a.layers} layers): GRACE {n} entries, key dim "
                  f"{c['key_dim']}: generation {c['live_s']:.2f}s vs {c['unedited_s']:.2f}s -> ratio "
                  f"{c['ratio']:.3f}", flush=True)
        if a.json:
            print(json.dumps({"cells": cells}))
        return 0
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
