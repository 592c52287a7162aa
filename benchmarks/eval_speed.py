"""Evaluation throughput: records/second of kedit's measurement (every probe of a record: greedy generations for
exact match / locality, fluency generation, teacher-forced scores), batched vs one prompt per forward pass,
measured in the same run on the same records and model, printed as a ratio.

    python benchmarks/eval_speed.py                       # 1,000 testbed records, batched and one-at-a-time
    python benchmarks/eval_speed.py --unbatched-n 100     # time the slow path on the first 100 records only
    python benchmarks/eval_speed.py --json

Uses the committed testbed GPT-2 (``kedit.testbed.load_testbed_model("gpt2")``) and its edit requests. When the
testbed assets are not built yet, it falls back to the testbed *world* (generated from its seed), a tokenizer trained
on it and an untrained model of the testbed GPT-2's exact shape -- the same cost per forward pass -- and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _setup(arch: str) -> tuple[Any, Any, Any, str]:
    from kedit.testbed import assets_dir, load_testbed_model, load_world

    if (assets_dir() / arch / "config.json").is_file():
        model, tok = load_testbed_model(arch)
        return model, tok, load_world(), f"testbed-{arch} (trained)"
    from kedit.testbed.build import VOCAB_SIZE
    from kedit.testbed.tokenizer import train_tokenizer
    from kedit.testbed.train import DEFAULT_SPECS, build_model
    from kedit.testbed.world import generate_world, training_sentences

    world = generate_world(0)
    text = training_sentences(world)
    tok = train_tokenizer(text["facts"] + text["two_hop"] + text["filler"], VOCAB_SIZE[False])
    model = build_model(DEFAULT_SPECS[arch], len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, 0)
    return model.eval(), tok, world, f"testbed-{arch} shape, untrained (testbed assets not built yet)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="records (batched path)")
    ap.add_argument("--unbatched-n", type=int, default=None, help="records timed one-at-a-time (default: --n)")
    ap.add_argument("--batch-size", type=int, default=64, help="prompts per forward pass (batched path)")
    ap.add_argument("--arch", default="gpt2", choices=["gpt2", "llama"])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from kedit.eval.scoring import ScoringConfig, observe
    from kedit.testbed import edit_requests

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, world, which = _setup(args.arch)
    reqs = edit_requests(world, n=args.n)
    n_slow = min(args.unbatched_n or len(reqs), len(reqs))
    probes = sum(1 + len(r.paraphrases) + len(r.aliases) + len(r.neighborhood) + len(r.portability) for r in reqs)

    observe(model, tok, reqs[:4], ScoringConfig(batch_size=args.batch_size))  # warm-up
    t0 = time.perf_counter()
    fast = observe(model, tok, reqs, ScoringConfig(batch_size=args.batch_size))
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = observe(model, tok, reqs[:n_slow], ScoringConfig(batch_size=1))
    t_slow = time.perf_counter() - t0

    # same measurements either way (generations identical; teacher-forced argmaxes identical)
    same_gen = sum(a.group(g)[i].generation == b.group(g)[i].generation
                   for a, b in zip(fast, slow) for g in a.groups for i in range(len(a.group(g))))
    total_gen = sum(len(a.group(g)) for a in slow for g in a.groups)
    result = {
        "model": which,
        "threads": torch.get_num_threads(),
        "records_batched": len(reqs),
        "records_one_at_a_time": n_slow,
        "probes_per_record": round(probes / len(reqs), 2),
        "batched_records_per_s": round(len(reqs) / t_fast, 2),
        "one_at_a_time_records_per_s": round(n_slow / t_slow, 2),
        "speedup": round((len(reqs) / t_fast) / (n_slow / t_slow), 2),
        "identical_generations": f"{same_gen}/{total_gen}",
        "batched_s": round(t_fast, 2),
        "one_at_a_time_s": round(t_slow, 2),
    }
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        print(f"model: {which}; {result['probes_per_record']} probes/record; {result['threads']} threads")
        print(f"batched (batch {args.batch_size}): {result['batched_records_per_s']} records/s "
              f"({len(reqs)} records in {result['batched_s']} s)")
        print(f"one prompt per forward: {result['one_at_a_time_records_per_s']} records/s "
              f"({n_slow} records in {result['one_at_a_time_s']} s)")
        print(f"speedup: {result['speedup']}x  (identical generations: {result['identical_generations']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
