"""Rollback memory after n sequential edits: bytes held for exact revert vs the touched parameters' bytes.

    python benchmarks/rollback_memory.py                       # 60 sequential ROME edits of testbed-gpt2
    python benchmarks/rollback_memory.py --n 60 --method rome --model testbed-gpt2 --json out.json

Edits testbed requests ``0..n-1`` one at a time (``batch_size=1``, each computed on the already edited model),
then reports the bytes held for rollback, the bytes of the distinct touched parameters and of the deltas' factors,
and checks that reverting every edit (newest first) restores the model bitwise. Runs against whichever kedit is on
``PYTHONPATH``: with a kedit that predates the rollback ledger it sums the per-delta copies (``_state.originals``),
which is how the "before" number of the issue was measured.
"""

from __future__ import annotations

import argparse
import json
import time


def held_bytes(model, deltas) -> tuple[int, str]:
    import kedit.deltas as kd

    if hasattr(kd, "rollback_bytes"):
        return kd.rollback_bytes(model), "ledger (one base copy per touched parameter)"
    total = sum(t.numel() * t.element_size() for d in deltas for t in d._state.originals.values())
    return total, "per-delta copies of the originals"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--method", default="rome")
    ap.add_argument("--model", default="testbed-gpt2")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    import kedit
    from kedit.core.context import EditContext
    from kedit.testbed import edit_requests, load_world

    model, tok = kedit.load_model(args.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reqs = edit_requests(load_world(), n=args.n)
    t0 = time.perf_counter()
    result = kedit.edit(model, tok, reqs, method=args.method, batch_size=1, ctx=EditContext(), evaluate=False)
    edit_s = time.perf_counter() - t0
    held, scheme = held_bytes(model, result.deltas)
    touched = {u.param for d in result.deltas for u in d.updates}
    touched_bytes = sum(model.get_parameter(n).numel() * model.get_parameter(n).element_size() for n in touched)
    factors = sum(t.numel() * t.element_size() for d in result.deltas for u in d.updates for t in u.tensors().values())
    t1 = time.perf_counter()
    result.revert(model)
    revert_s = time.perf_counter() - t1
    exact = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    row = {
        "method": args.method, "model": args.model, "n_edits": args.n, "scheme": scheme,
        "touched_params": sorted(touched), "touched_bytes": touched_bytes, "factor_bytes": factors,
        "rollback_bytes": held, "ratio_to_touched": round(held / touched_bytes, 3),
        "bound_2x_plus_factors": 2 * touched_bytes + factors, "within_bound": held <= 2 * touched_bytes + factors,
        "revert_all_bitwise": exact, "edit_s": round(edit_s, 2), "revert_all_s": round(revert_s, 3),
    }
    print(json.dumps(row, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)


if __name__ == "__main__":
    main()
