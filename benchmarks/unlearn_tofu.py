"""Unlearning on the testbed (protocol unlearn/v1): forget quality vs model utility per method, against the retain
model, in one run.

    python benchmarks/unlearn_tofu.py                                     # GA, GradDiff, NPO, RKLD, SimNPO, RMU
    python benchmarks/unlearn_tofu.py --methods npo rkld --set npo:epochs=10 --json out.json
    python benchmarks/unlearn_tofu.py --split forget10 --arch gpt2 --markdown    # the table of docs/unlearning.md

The retain model (``kedit unlearn-retain --split forget10``) is measured once; each method is run with its
defaults (plus ``--set method:key=value`` overrides), its delta applied to the original, measured, and reverted
(checked bitwise). Rows: forget quality, model utility (and the ratio to the retain model's), forget truth ratio
and probability, forget recall, recall of every untouched fact, MIA AUCs, time.
"""

from __future__ import annotations

import argparse
import json
import logging
import time


def parse_overrides(items: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items:
        if ":" not in item or "=" not in item:
            raise SystemExit(f"--set expects method:key=value, got {item!r}")
        method, kv = item.split(":", 1)
        k, v = kv.split("=", 1)
        try:
            val = json.loads(v)
        except json.JSONDecodeError:
            val = v
        out.setdefault(method, {})[k] = val
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="forget10")
    ap.add_argument("--arch", default="gpt2")
    ap.add_argument("--methods", nargs="*", default=["grad_ascent", "grad_diff", "npo", "rkld", "simnpo", "rmu"])
    ap.add_argument("--set", dest="sets", action="append", default=[], help="method:key=value (JSON value)")
    ap.add_argument("--label", action="append", default=[], help="method=label for the table (repeatable)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", dest="json_out")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    from kedit.fingerprint import model_fingerprint
    from kedit.testbed import load_testbed_model
    from kedit.unlearn.evaluate import evaluate_model, reference_from
    from kedit.unlearn.retain_model import load_retain_model
    from kedit.unlearn.run import unlearn
    from kedit.unlearn.splits import testbed_split

    torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.sets)
    model, tok = load_testbed_model(args.arch)
    split = testbed_split(args.split)
    t0 = time.time()
    retain, _ = load_retain_model(args.split, args.arch)
    ref = reference_from(retain, tok, split)
    rows = [{"method": "retain model", **ref.summary, "seconds": round(time.time() - t0, 1)}]
    base = evaluate_model(model, tok, split, ref)
    rows.append({"method": "original", **base})
    fp = model_fingerprint(model)
    for method in args.methods:
        t0 = time.time()
        res = unlearn(model, tok, split, method, overrides.get(method))
        train_s = time.time() - t0
        with res.delta.applied(model):
            metrics = evaluate_model(model, tok, split, ref)
        assert model_fingerprint(model) == fp, "revert was not bitwise"
        rows.append({"method": method, "config": overrides.get(method, {}), **metrics, "train_seconds": round(train_s, 1)})
        print(json.dumps({k: rows[-1].get(k) for k in ("method", "config", "forget_quality", "model_utility",
                                                       "forget_Truth_Ratio", "forget_recall", "untouched_recall",
                                                       "train_seconds")}), flush=True)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    if args.markdown:
        mu_ref = ref.model_utility
        print("| method | forget quality | model utility | MU / retain MU | forget TR | forget recall | untouched "
              "recall | MIA LOSS AUC | MIA Min-K%++ AUC | train s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            fq = r.get("forget_quality")
            print(f"| {r['method']} | {'' if fq is None else f'{fq:.3g}'} | {r['model_utility']:.3f} | "
                  f"{r['model_utility'] / mu_ref:.3f} | {r['forget_Truth_Ratio']:.3f} | {r['forget_recall']:.3f} | "
                  f"{r.get('untouched_recall', float('nan')):.3f} | {r['mia_loss_auc']:.3f} | "
                  f"{r['mia_min_k_plus_plus_auc']:.3f} | {r.get('train_seconds', '')} |")


if __name__ == "__main__":
    main()
