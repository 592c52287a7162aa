"""UltraEdit against MEMIT on one lifelong edit stream: wall time of the same stream of edits applied in chunks of k
through each method, in one run, and the ratio (issue #13's target: UltraEdit ≤ 0.25 × MEMIT for 1,000 edits).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/ultraedit_stream.py                 # 1,000 edits, k = 10
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/ultraedit_stream.py -n 20 -k 10 --json out.json   # a smoke run

The stream is the one ``kedit eval --protocol lifelong/v1 --data testbed:0-1500 --whole-subjects --limit N -k K``
edits (:func:`kedit.eval.lifelong.make_stream`: every request of as few subjects as give N, re-edit rate 0.1, seed
0, the testbed's re-edit targets). Each method starts from a freshly loaded model and a fresh in-memory
:class:`~kedit.core.context.EditContext`, so a method that needs second-moment statistics (MEMIT) pays for them
inside its time, as a real first stream does; the time of the first chunk is printed separately. No evaluation runs:
only ``kedit.edit(..., apply=True, evaluate=False)`` per chunk, as in ``lifelong/v1``. The methods run one after the
other in this process (each on ``--threads`` threads), so they share the machine alike only when nothing else
changes its load in between; on shared cores, read the ratio with the load in mind.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_stream(n: int, k: int, seed: int = 0) -> list:
    """The ``lifelong/v1`` stream of ``n`` edits over ``testbed:0-1500`` with ``--whole-subjects``."""
    from kedit.data import whole_subjects
    from kedit.eval.lifelong import make_stream, testbed_reedit_targets
    from kedit.testbed import edit_requests, load_world

    world = load_world()
    reqs = whole_subjects(edit_requests(world, n=1500)[:1500], limit=n)
    return make_stream(reqs, n, 0.1, k=k, seed=seed, targets=testbed_reedit_targets(world))


def run_method(method: str, model_name: str, stream: list, k: int, overrides: dict | None) -> dict:
    """Apply ``stream`` in chunks of ``k`` through ``method`` on a fresh model; wall times in seconds."""
    from tqdm import tqdm

    from kedit.api import edit, load_model
    from kedit.core.context import EditContext
    from kedit.fingerprint import model_fingerprint

    model, tok = load_model(model_name)
    before = model_fingerprint(model)
    ctx = EditContext(seed=0)
    chunks = [stream[i : i + k] for i in range(0, len(stream), k)]
    applied, times = [], []
    t_all = time.perf_counter()
    for chunk in tqdm(chunks, desc=method, unit="chunk"):
        t0 = time.perf_counter()
        applied.append(edit(model, tok, chunk, method=method, config=overrides, ctx=ctx, apply=True, evaluate=False))
        times.append(time.perf_counter() - t0)
    total = time.perf_counter() - t_all
    while applied:  # leave the model as loaded (and check it): the stream's edits are undone newest first
        applied.pop().revert(model)
    if model_fingerprint(model) != before:
        raise RuntimeError(f"{method}: the model was not restored after the stream")
    return {
        "method": method,
        "edits": len(stream),
        "chunks": len(chunks),
        "seconds": round(total, 3),
        "first_chunk_s": round(times[0], 3),
        "rest_per_edit_s": round(sum(times[1:]) / max(1, len(stream) - len(chunks[0])), 4),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="testbed-gpt2", help="testbed-gpt2, testbed-llama or a model path")
    ap.add_argument("-n", "--edits", type=int, default=1000, help="stream length (default 1000)")
    ap.add_argument("-k", "--chunk", type=int, default=10, help="edits per call (default 10)")
    ap.add_argument("--methods", nargs=2, default=["ultraedit", "memit"], metavar=("FAST", "BASE"),
                    help="the method timed and the one it is compared with (default: ultraedit memit)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.edits < 1 or args.chunk < 1:
        ap.error("-n and -k must be at least 1")
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    stream = build_stream(args.edits, args.chunk)
    rows = [run_method(m, args.model, stream, args.chunk, None) for m in args.methods]
    for r in rows:
        print(f"{r['method']}: {r['edits']} edits in {r['chunks']} chunks of {args.chunk}: {r['seconds']:.1f} s "
              f"(first chunk {r['first_chunk_s']:.1f} s, then {r['rest_per_edit_s']:.3f} s/edit)")
    ratio = rows[0]["seconds"] / rows[1]["seconds"]
    print(f"{rows[0]['method']} / {rows[1]['method']} wall time: {ratio:.3f} x (target <= 0.25 x)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"model": args.model, "k": args.chunk, "threads": args.threads, "rows": rows,
                       "ratio": round(ratio, 4)}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
