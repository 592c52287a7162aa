"""Markdown table of ``benchmarks/unlearn_heldout.py`` JSON lines: python benchmarks/unlearn_heldout_table.py FILE."""

from __future__ import annotations

import json
import sys


def fmt(x: float | None) -> str:
    if x is None:
        return "–"
    return "< 1e-12" if x < 1e-12 else f"{x:.2g}"


def main() -> None:
    rows = [json.loads(line) for line in open(sys.argv[1], encoding="utf-8") if line.strip()]
    print("| run | epochs | best FQ(A) at epoch | FQ(B) / FQ(full) there | MU/retain there | chosen epoch (FQ(A) best with MU ≥ 0.95×) | "
          "FQ(A) | **FQ(B) held out** | FQ(full) | MU/retain | last epoch FQ(full) | last MU/retain | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b, c, f = r["best_A_unconstrained"], r["chosen"], r["final"]
        first = r["checks"][0]
        n_ep = r["trajectory"][-1]["epoch"]
        cc = (f"none of the first {len(r['checks'])}", "–", "–", "–", "–") if c is None else (
            f"{c['epoch']:g}", fmt(c["forget_quality_A"]), fmt(c["forget_quality_B"]), fmt(c["forget_quality_full"]),
            f"{c['mu_ratio']:.3f}")
        print(f"| {r['label']} | {n_ep:g} | {fmt(b['forget_quality_A'])} at {b['epoch']:g} | "
              f"{fmt(b['forget_quality_B'])} / {fmt(b['forget_quality'])} | {first['mu_ratio']:.3f} | {' | '.join(cc)} | {fmt(f['forget_quality'])} | {f['mu_ratio']:.3f} | "
              f"{r['train_seconds']:.0f} |")


if __name__ == "__main__":
    main()
