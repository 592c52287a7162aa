"""Held-out stopping-epoch selection for unlearning on the testbed (protocol unlearn/v1, issue #14).

Each run trains one method / setting with a trajectory probe (:func:`kedit.unlearn.evaluate.trajectory_probe`):
forget quality (KS p-value vs the retain model's truth ratios) on the whole forget set and on its two person halves
A and B (:func:`kedit.unlearn.splits.forget_halves`) at the end of every epoch, and keeps a copy of the trained
weights at each epoch. The stopping epoch is chosen on **half A only**: epochs in order of FQ(A), best first, are
fully measured (model utility needs generation) until one has MU ≥ 0.95 × the retain model's (at most
``--max-checks``); the reported figures of the chosen epoch are FQ(B) (held out) and FQ(full) (half A is in it).
The last epoch is also fully measured (the run as ``kedit unlearn`` would report it).

    python benchmarks/unlearn_heldout.py --method rkld --set alpha=50 --set lr=3e-4 --set retain_weight=1.0 \\
        --set epochs=30 --out runs/heldout.jsonl            # one JSON line per run, appended

Full-weight runs only (the per-epoch weights are rebuilt by loading the kept trainable tensors into a copy).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="forget10")
    ap.add_argument("--arch", default="gpt2")
    ap.add_argument("--method", required=True)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="key=value (JSON value)")
    ap.add_argument("--mu-ratio", type=float, default=0.95)
    ap.add_argument("--max-checks", type=int, default=3)
    ap.add_argument("--every-steps", type=int, default=0, help="also probe every N steps (default: epochs only)")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", required=True, help="JSON-lines file (appended)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    from kedit.fingerprint import model_fingerprint
    from kedit.testbed import load_testbed_model
    from kedit.unlearn.evaluate import evaluate_model, reference_from, trajectory_probe
    from kedit.unlearn.retain_model import load_retain_model
    from kedit.unlearn.run import unlearn
    from kedit.unlearn.splits import forget_halves, testbed_split

    torch.set_num_threads(1)
    overrides = {}
    for kv in args.sets:
        k, v = kv.split("=", 1)
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    if overrides.get("lora"):
        raise SystemExit("full-weight runs only")
    model, tok = load_testbed_model(args.arch)
    fp = model_fingerprint(model)
    split = testbed_split(args.split)
    retain, _ = load_retain_model(args.split, args.arch)
    t0 = time.time()
    ref = reference_from(retain, tok, split)
    ref_s = time.time() - t0
    halves = forget_halves(split)
    inner = trajectory_probe(tok, split, ref, groups=halves)
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def probe(m, where):
        rec = inner(m, where)
        snapshots[where["step"]] = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
        return rec

    t0 = time.time()
    res = unlearn(model, tok, split, args.method, overrides, probe=probe, probe_every_steps=args.every_steps)
    total_s = time.time() - t0
    traj = res.log["train"]["trajectory"]
    mu_ref = ref.model_utility

    def full_eval(step: int | None) -> dict:
        if step is None:
            with res.delta.applied(model):
                out = evaluate_model(model, tok, split, ref)
            assert model_fingerprint(model) == fp, "revert was not bitwise"
            return out
        m = copy.deepcopy(model)
        with torch.no_grad():
            params = dict(m.named_parameters())
            for n, t in snapshots[step].items():
                params[n].copy_(t)
        m.eval()
        return evaluate_model(m, tok, split, ref)

    keys = ("forget_quality", "model_utility", "forget_Truth_Ratio", "forget_Q_A_Prob", "forget_recall",
            "untouched_recall", "mia_loss_auc") + tuple(
        f"{s}_{m}" for s in ("retain", "entities", "world") for m in ("Q_A_Prob", "Q_A_ROUGE", "Truth_Ratio"))
    order = sorted(traj, key=lambda r: (-r["forget_quality_A"], r["step"]))
    checks = []
    chosen = None
    for r in order[: args.max_checks]:
        ev = full_eval(r["step"])
        checks.append({"epoch": r["epoch"], "step": r["step"], **{k: ev.get(k) for k in keys},
                       "mu_ratio": ev["model_utility"] / mu_ref})
        if ev["model_utility"] >= args.mu_ratio * mu_ref:
            chosen = r
            break
    last = full_eval(None)
    final = {k: last.get(k) for k in keys} | {"mu_ratio": last["model_utility"] / mu_ref}
    row = {
        "label": args.label,
        "method": args.method,
        "config": overrides,
        "split": args.split,
        "every_steps": args.every_steps,
        "retain_model_utility": mu_ref,
        "reference_seconds": round(ref_s, 1),
        "train_seconds": res.log["train"]["seconds"],
        "probe_seconds": res.log["train"]["probe_seconds"],
        "total_seconds": round(total_s, 1),
        "trajectory": traj,
        "checks": checks,
        "chosen": None if chosen is None else {
            "epoch": chosen["epoch"],
            "forget_quality_A": chosen["forget_quality_A"],
            "forget_quality_B": chosen["forget_quality_B"],
            "forget_quality_full": chosen["forget_quality"],
            **{k: v for k, v in checks[-1].items() if k not in ("epoch", "step", "forget_quality")},
        },
        "best_A_unconstrained": {k: order[0][k] for k in ("epoch", "forget_quality_A", "forget_quality_B",
                                                          "forget_quality")},
        "final": final,
        "last_epoch_probe_fq": traj[-1].get("forget_quality"),
    }
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    brief = {k: row[k] for k in ("label", "config", "chosen", "best_A_unconstrained", "final", "total_seconds")}
    print(json.dumps(brief), flush=True)


if __name__ == "__main__":
    main()
