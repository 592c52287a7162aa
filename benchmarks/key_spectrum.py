"""Eigen-spectrum of the key second moment ``C = E[k kᵀ]`` at AlphaEdit's edited layers of a testbed model: is there
a null space for AlphaEdit's projection (Fang et al., ICLR 2025) at width 160?

    PYTHONPATH=src python benchmarks/key_spectrum.py                  # testbed-gpt2 and testbed-llama
    PYTHONPATH=src python benchmarks/key_spectrum.py --models gpt2 --json spectrum.json
    PYTHONPATH=src python benchmarks/key_spectrum.py --models gpt2 --build DIR --layers 0 1 2   # a width-series build

Per layer: d_k, the largest and smallest eigenvalue, deciles of the spectrum relative to the largest, and the
dimension ``m`` of the null space each threshold rule keeps (:func:`kedit.core.solve.nullspace_basis`): the paper's
absolute τ = 2e-2, relative τ·max for τ = 1e-2 (the testbed preset), 1e-3, 1e-4, and the energy tail holding 1 % of
``tr C``; with the share of the preserved keys' energy ``tr(PC)/tr(C)`` that the projector leaves (what an update
in the null space can still move).

``--build DIR`` reads the models of a testbed build directory (``kedit testbed build --width 320 --out DIR``)
instead of the committed one; its statistics come from its own world's corpus. A build at another width matches no
AlphaEdit preset, so give it ``--layers`` (the committed testbed presets edit 0 1 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RULES = (("absolute", 2e-2), ("relative", 1e-2), ("relative", 1e-3), ("relative", 1e-4), ("energy", 1e-2))


def spectrum(name: str, build: str | None = None, layers: list[int] | None = None) -> list[dict]:
    import torch

    import kedit
    from kedit.core.context import EditContext
    from kedit.core.solve import nullspace_basis
    from kedit.methods.presets import preset_name_for
    from kedit.testbed import load_testbed_model

    model, tok = load_testbed_model(name, assets_dir=build)
    if layers is None and preset_name_for("alphaedit", model) is None:
        raise SystemExit(f"no AlphaEdit preset matches the {name} model of {build}: give --layers")
    cfg = kedit.get_method("alphaedit").default_config(model)
    layers = list(layers if layers is not None else cfg.layers)
    ctx = EditContext()
    stats = ctx.second_moments(model, tok, layers, n_tokens=cfg.mom2_n_tokens)
    width = int(getattr(model.config, "n_embd", None) or model.config.hidden_size)
    rows = []
    for layer in layers:
        C = stats[layer].mean.double()
        C = 0.5 * (C + C.T)
        ev = torch.linalg.eigvalsh(C)
        top = float(ev.max())
        deciles = [float(ev[int(q * (len(ev) - 1))] / top) for q in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9)]
        rules = {}
        for mode, tau in RULES:
            U = nullspace_basis(C, tau, mode=mode)
            kept = float((U.T @ C @ U).trace() / C.trace()) if U.shape[1] else 0.0
            rules[f"{mode}:{tau:g}"] = {"dims": int(U.shape[1]), "energy_left": kept}
        rows.append(
            {
                "model": f"testbed-{name}",
                "width": width,
                "layer": int(layer),
                "d_k": int(C.shape[0]),
                "tokens": int(stats[layer].count) if hasattr(stats[layer], "count") else None,
                "eig_max": top,
                "eig_min": float(ev.min()),
                "deciles_rel": deciles,
                "rules": rules,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["gpt2", "llama"], choices=["gpt2", "llama"])
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--build", default=None, help="a testbed build directory (default: the committed testbed)")
    ap.add_argument("--layers", nargs="+", type=int, default=None, help="layers (default: the AlphaEdit preset's)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = []
    for name in args.models:
        for r in spectrum(name, args.build, args.layers):
            out.append(r)
            dec = " ".join(f"{x:.1e}" for x in r["deciles_rel"])
            rules = "  ".join(f"{k} m={v['dims']} left={v['energy_left']:.1e}" for k, v in r["rules"].items())
            print(f"{r['model']} (width {r['width']}) layer {r['layer']}: d_k {r['d_k']}  eig max {r['eig_max']:.3e} min {r['eig_min']:.3e}")
            print(f"    eig/max at 0,10,25,50,75,90 %: {dec}")
            print(f"    {rules}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
