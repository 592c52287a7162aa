"""Forgetting-aware fine-tuning vs EWC-on-LoRA on the testbed analogue, in ONE run (same phase 1, phase 2 and data):

    OMP_NUM_THREADS=1 python benchmarks/finetune_forgetting.py                  # testbed-gpt2, the CLI's defaults
    OMP_NUM_THREADS=1 python benchmarks/finetune_forgetting.py --extra 'si:{"layer_coeff":"static","weight":30}'

Rows: ``none`` (plain LoRA, the forgetting reference), ``si`` (Synaptic Intelligence + layer-wise coefficients, the
defaults of ``kedit finetune``), ``ewc`` (EWC-LoRA: full-space Fisher of each adapted weight, the baseline the
ratios use), ``ewc-ab`` (the naive per-factor EWC on ``A`` and ``B``) and any ``--extra`` ``reg:{json overrides}``. Printed per row:
time of the importance estimation (SI: the accumulation inside the phase-1 loop; EWC: the Fisher pass), wall time
of the whole run (phase 1 + importances + phase 2), bytes of the stored state phase 2 needs (importances + anchor),
old-world recall after (forgetting = before − after) and new-fact recall (phase-2 learning); then the ratios SI /
EWC with the targets (time ≤ 0.2×, state ≤ 0.15×, forgetting no worse).
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="testbed-gpt2")
    ap.add_argument("--phase1-texts", type=int, default=2000)
    ap.add_argument("--new-persons", type=int, default=24)
    ap.add_argument("--old-probes", type=int, default=600)
    ap.add_argument("--set", action="append", default=[], help="key=value (JSON) for every row")
    ap.add_argument("--extra", action="append", default=[], help="another row: reg or 'reg:{json overrides}'")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args()

    import torch

    import kedit
    from kedit.finetune.domain import new_domain, old_world_probes
    from kedit.finetune.experiment import TestbedData, run_testbed
    from kedit.finetune.run import FinetuneConfig, measure_recall
    from kedit.testbed import load_world

    torch.set_num_threads(1)
    common = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    rows_spec = [("none", {}), ("si", {}), ("ewc", {}), ("ewc-ab", {})]
    for e in args.extra:
        reg, _, js = e.partition(":")
        rows_spec.append((reg, json.loads(js) if js else {}))
    model, tok = kedit.load_model(args.model)
    world = load_world()
    data = TestbedData(args.phase1_texts, args.new_persons, args.old_probes)
    domain = new_domain(world, data.new_persons, data.domain_seed)
    baseline = {
        "old_recall_before": measure_recall(model, tok, old_world_probes(world, data.old_probes)),
        "new_recall_before": measure_recall(model, tok, domain.probes),
    }
    print(
        f"{args.model}: {data}, before: old-world recall {baseline['old_recall_before']:.3f}, new-fact recall "
        f"{baseline['new_recall_before']:.3f}",
        flush=True,
    )
    rows = []
    for reg, over in rows_spec:
        cfg = FinetuneConfig().replace(regularize=reg, **{**common, **over}).resolved()
        res, m = run_testbed(model, tok, world, cfg, data, baseline=baseline)
        imp = res.log.get("importance") or {}
        row = {
            "name": reg + (f" {json.dumps(over)}" if over else ""),
            "regularize": reg,
            "layer_coeff": cfg.layer_coeff,
            "weight": cfg.weight,
            "importance_s": imp.get("seconds", 0.0),
            "phase1_s": res.log["phase1"]["seconds"],
            "phase2_s": res.log["phase2"]["seconds"],
            "total_s": res.log["seconds"],
            "state_bytes": imp.get("state_bytes", 0),
            "importance_bytes": imp.get("weight_bytes", 0),
            **{k: m[k] for k in ("old_recall_after", "forgetting", "new_recall_after", "learning")},
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    hdr = f"| {'run':42s} | importance s | total s | state bytes | old recall | forgetting | new recall |"
    print("\n" + hdr + "\n|" + "---|" * 7)
    for r in rows:
        print(
            f"| {r['name'][:42]:42s} | {r['importance_s']:12.3f} | {r['total_s']:7.1f} | {r['state_bytes']:11,d} "
            f"| {r['old_recall_after']:10.3f} | {r['forgetting']:10.3f} | {r['new_recall_after']:10.3f} |"
        )
    si = next(r for r in rows if r["name"] == "si")
    ewc = next(r for r in rows if r["name"] == "ewc")
    print(
        f"\nSI / EWC-on-LoRA: importance time {si['importance_s'] / ewc['importance_s']:.3f}x (target <= 0.2x), "
        f"whole run {si['total_s'] / ewc['total_s']:.3f}x, stored state {si['state_bytes'] / ewc['state_bytes']:.3f}x"
        f" (target <= 0.15x), forgetting {si['forgetting']:.3f} vs {ewc['forgetting']:.3f} (target: no worse), "
        f"phase-2 learning {si['learning']:.3f} vs {ewc['learning']:.3f}"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {"model": args.model, "data": vars(data), "baseline": baseline, "rows": rows}, f, indent=1
            )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
