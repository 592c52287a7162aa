"""Per-layer norm of a MEMIT (or PMET/EMMET/BLUE) update on a testbed model, next to the weight it edits and the
spectrum of that layer's key second moment ``C = E[k kᵀ]`` (issue #11 item 9: dead key directions).

    PYTHONPATH=src python benchmarks/memit_update_norms.py                     # memit, testbed-gpt2, 10 requests
    PYTHONPATH=src python benchmarks/memit_update_norms.py --method memit-blue --model llama --n 50

Prints one line per edited layer: ‖Δ‖_F, ‖W‖_F, how many eigenvalues of C are ≤ 1e-6·max, and the share of ‖Δ‖²
that lies in those directions.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="memit")
    ap.add_argument("--model", default="gpt2", choices=["gpt2", "llama"])
    ap.add_argument("--n", type=int, default=10, help="the first N testbed edit requests, edited as one batch")
    ap.add_argument("--rel", type=float, default=1e-6, help="eigenvalues ≤ rel·max(eig C) count as dead")
    args = ap.parse_args(argv)

    import torch

    import kedit
    from kedit.arch import get_adapter, is_transposed
    from kedit.core.context import EditContext
    from kedit.testbed import edit_requests, load_testbed_model, load_world

    model, tok = load_testbed_model(args.model)
    ctx = EditContext()
    res = kedit.edit(model, tok, edit_requests(load_world(), n=args.n), method=args.method, ctx=ctx,
                     apply=False, evaluate=False)
    (delta,) = res.deltas
    adapter = get_adapter(model)
    cfg = kedit.get_method(args.method).default_config(model)
    print(f"{args.method} on testbed-{args.model}, {args.n} requests")
    for upd in delta.updates:
        layer = next(l for l in range(adapter.num_layers(model)) if adapter.weight_name("mlp_out", l) == upd.param)
        module = adapter.module(model, "mlp_out", layer)
        dense = upd.dense(dtype=torch.float64)
        dense = dense.T if is_transposed(module) else dense  # [d, d_k]
        C = ctx.second_moments(model, tok, [layer], n_tokens=cfg.mom2_n_tokens)[layer].mean.double()
        evals, evecs = torch.linalg.eigh(0.5 * (C + C.T))
        dead = evals <= args.rel * evals.max()
        share = float((dense @ evecs[:, dead]).norm() ** 2 / dense.norm() ** 2) if dead.any() else 0.0
        print(f"layer {layer}: |delta| {float(dense.norm()):10.3f}  |W| {float(module.weight.detach().norm()):8.3f}  "
              f"dead eigenvalues {int(dead.sum()):3d}/{len(evals)}  share of |delta|^2 in them {share:.3e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
