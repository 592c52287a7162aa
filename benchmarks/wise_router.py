"""WISE's router at many live edits: build a real side memory from a lifelong stream once, save it, then time
greedy generation with it loaded -- exact router vs the two-stage one vs the unedited model.

    python benchmarks/wise_router.py build --out runs/wise-router-gpt2 --edits 1000 --save-at 100 300 1000
    python benchmarks/wise_router.py time --memory runs/wise-router-gpt2/mem-{100,300,1000} --threads 1

``build``: the lifelong stream of the lifelong protocol (``kedit eval ... --data testbed:0-1500 --whole-subjects
--limit N``: every request of as few subjects as give N requests, interleaved), edited with the WISE preset one
request after another on the live memory (chunks of ``--chunk`` requests per ``kedit.edit`` call, each trained on
the memory the earlier ones left), and ``kedit.memory.save_memory`` at every ``--save-at`` count (``mem-<N>``).
The frozen slice ``testbed:1500-1550`` is never read.

``time``: see :func:`time_memory`. Prints the ratios to the unedited time, the router's own time per generation
run, the mean number of memories scored exactly per row by the two-stage router and the share of rows whose
decision (memory or main) and chosen memory agree between the two routers (must be 100 %).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def stream(n: int):
    from kedit.data import whole_subjects
    from kedit.testbed import edit_requests, load_world

    pool = edit_requests(load_world(), n=1500)[:1500]
    edits = whole_subjects(pool, limit=n)
    subjects = {r.subject for r in edits}
    others = [r for r in pool if r.subject not in subjects]
    return edits, others


def build(a) -> int:
    import torch

    import kedit
    from kedit.memory import get_memory, save_memory

    model, tok = kedit.load_model(a.model)
    edits, _ = stream(max(a.save_at))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    done, t0 = 0, time.perf_counter()
    marks = sorted(a.save_at)
    log = []
    while done < marks[-1]:
        stop = min(done + a.chunk, next(m for m in marks if m > done))
        kedit.edit(model, tok, edits[done:stop], method="wise", evaluate=False)
        done = stop
        n_mem = sum(len(b.deltas) for b in get_memory(model).values() if hasattr(b, "deltas"))
        print(f"{done} edits, {n_mem} memories, {time.perf_counter() - t0:.0f} s", flush=True)
        if done in marks:
            save_memory(model, out / f"mem-{done}")
            log.append({"edits": done, "memories": n_mem, "elapsed_s": round(time.perf_counter() - t0, 1)})
            (out / "build.json").write_text(json.dumps({"model": a.model, "threads": torch.get_num_threads(),
                                                        "checkpoints": log}, indent=1))
    return 0


def time_memory(a) -> dict:
    """Greedy generation on ``--prompts`` prompts (half the stream's edited prompts, half prompts of subjects the
    stream never edits, batched as the evaluation does) with the saved memory loaded: the exact router, the
    two-stage router and no memory (hooks removed), alternating in one process, fastest of ``--repeats``."""
    import functools

    import torch

    import kedit
    from kedit.api import greedy_answers
    from kedit.memory import get_memory, load_memory
    from kedit.memory.side import SideMemory

    model, tok = kedit.load_model(a.model)
    n_edits = int(Path(a.memory).name.split("-")[-1])
    load_memory(model, a.memory)
    mem = next(b for b in get_memory(model).values() if isinstance(b, SideMemory))
    module = model.get_submodule(mem.module_path)
    edits, others = stream(n_edits)
    half = a.prompts // 2
    prompts = [r.text for r in edits[:half]] + [r.text for r in others[: a.prompts - half]]
    orig = mem.ratios
    calls: dict[str, list] = {"exact": [], "bounded": []}
    router_s = {"exact": 0.0, "bounded": 0.0}

    def spy(acts, real=None, mode="exact"):
        t = time.perf_counter()
        out = orig(acts, real, bounded=mode == "bounded")
        router_s[mode] += time.perf_counter() - t
        cand = mem.last_candidates.sum(1).tolist() if mode == "bounded" else [len(mem.deltas)] * acts.shape[0]
        calls[mode].append((out[0].clone(), out[1].clone(), cand))
        return out

    def timed(mode: str) -> float:
        if mode == "unedited":
            mem.uninstall()
        else:
            mem.ratios = functools.partial(spy, mode=mode)
        try:
            t = time.perf_counter()
            greedy_answers(model, tok, prompts, max_new_tokens=8)
            return time.perf_counter() - t
        finally:
            if mode == "unedited":
                mem.install(module, model)

    mem.bounds()  # built once per change of the memories (as the stack); not part of a generation's time
    timed("bounded")  # warm-up
    for k in calls:
        calls[k].clear()
        router_s[k] = 0.0
    best = {"exact": [], "bounded": [], "unedited": []}
    for _ in range(a.repeats):
        for mode in best:
            best[mode].append(timed(mode))
    agree = total = 0
    for (be, ie, _), (bb, ib, _) in zip(calls["exact"], calls["bounded"]):
        de = torch.where(be > 1.0, ie, torch.full_like(ie, -1))
        db = torch.where(bb > 1.0, ib, torch.full_like(ib, -1))
        agree += int(((de == db) & (ie == ib)).sum())
        total += int(ie.numel())
    cands = [c for _, _, cs in calls["bounded"] for c in cs]
    un = min(best["unedited"])
    return {"model": a.model, "memory": a.memory, "edits": n_edits, "memories": len(mem.deltas),
            "prompts": len(prompts), "threads": torch.get_num_threads(),
            "unedited_s": round(un, 3), "exact_s": round(min(best["exact"]), 3),
            "bounded_s": round(min(best["bounded"]), 3),
            "exact_ratio": round(min(best["exact"]) / un, 3), "bounded_ratio": round(min(best["bounded"]) / un, 3),
            "router_exact_s_per_run": round(router_s["exact"] / a.repeats, 3),
            "router_bounded_s_per_run": round(router_s["bounded"] / a.repeats, 3),
            "candidates_mean": round(sum(cands) / max(len(cands), 1), 2), "candidates_max": max(cands, default=0),
            "agreement": agree / max(total, 1), "rows_compared": total}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--model", default="testbed-gpt2")
    b.add_argument("--out", required=True)
    b.add_argument("--save-at", type=int, nargs="+", default=[100, 300, 1000])
    b.add_argument("--chunk", type=int, default=50)
    b.add_argument("--threads", type=int, default=1)
    tm = sub.add_parser("time")
    tm.add_argument("--model", default="testbed-gpt2")
    tm.add_argument("--memory", nargs="+", required=True, help="saved memories (mem-<N> folders of build)")
    tm.add_argument("--prompts", type=int, default=256)
    tm.add_argument("--repeats", type=int, default=3)
    tm.add_argument("--threads", type=int, default=1)
    tm.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    if a.cmd == "build":
        return build(a)
    cells = []
    for path in a.memory:
        c = time_memory(argparse.Namespace(**{**vars(a), "memory": path}))
        cells.append(c)
        print(f"{c['model']} {c['edits']:>5} edits ({c['memories']} memories): unedited {c['unedited_s']:.2f}s, "
              f"exact router {c['exact_s']:.2f}s -> {c['exact_ratio']:.3f}x, two-stage {c['bounded_s']:.2f}s -> "
              f"{c['bounded_ratio']:.3f}x; router per run {c['router_exact_s_per_run']:.2f}s vs "
              f"{c['router_bounded_s_per_run']:.2f}s; exact scores per row {c['candidates_mean']} (max "
              f"{c['candidates_max']}) of {c['memories']}; decisions agree {c['agreement']:.1%} of "
              f"{c['rows_compared']} rows", flush=True)
    if a.json:
        print(json.dumps({"cells": cells}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
