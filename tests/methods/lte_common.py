"""Shared setup of the MEMIT-family tests (MEMIT, PMET, AlphaEdit, EMMET, BLUE): tiny models, injected templates, a
tiny statistics corpus, and helpers to read the recorded per-stage K, R, Z, H back as tensors."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import torch

from kedit.arch import get_adapter, is_transposed
from kedit.core.context import EditContext
from kedit.core.solve import DEAD_RTOL
from kedit.methods.registry import get_method
from kedit.requests import EditRequest
from kedit.testing import TINY_TEXT, tiny_model, tiny_tokenizer

TEMPLATES = ["{}", "Paris is a city. {}", "Because of that. {}"]
CORPUS = [s.strip() + "." for s in TINY_TEXT.split(".") if s.strip()] * 6
REQS = [
    EditRequest("{} plays the", "Toko Yasuda", "trumpet", case_id="a"),
    EditRequest("The capital of {} is", "France", "Berlin", case_id="b"),
]
LAYERS = (0, 1, 2)
N_TOKENS = 600

_TOK = None
_MODELS: dict[str, torch.nn.Module] = {}


def tok():
    global _TOK
    if _TOK is None:
        _TOK = tiny_tokenizer()
    return _TOK


def model(arch: str):
    """One tiny model per architecture for the whole session (compute never mutates it; tests that apply a delta
    revert it)."""
    if arch not in _MODELS:
        _MODELS[arch] = tiny_model(arch, vocab_size=len(tok()))
    return _MODELS[arch]


def ctx() -> EditContext:
    return EditContext(corpus=CORPUS, corpus_id="tiny", templates=TEMPLATES)


def config(method: str, **kw):
    base = {"layers": LAYERS, "v_steps": 5, "mom2_n_tokens": N_TOKENS, "debug": True}
    base.update(kw)
    return get_method(method).make_config(base)


def snapshot(m) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def unchanged(m, before) -> bool:
    return all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def stages(delta) -> list[dict]:
    """Recorded stages with K [d_k, n], R [d, n], Z, H, v0 [d, n] as float64 tensors."""
    out = []
    for st in delta.meta["debug"]["stages"]:
        out.append(
            {k: torch.tensor(v, dtype=torch.float64) if isinstance(v, list) else v for k, v in st.items()}
        )
    return out


def math_delta(m, delta, layer: int) -> torch.Tensor:
    """The dense update of ``mlp_out`` at ``layer`` in math orientation ``[d, d_k]`` (float64)."""
    adapter = get_adapter(m)
    name = adapter.weight_name("mlp_out", layer)
    (upd,) = [u for u in delta.updates if u.param == name]
    dense = upd.dense(dtype=torch.float64)
    return dense.T if is_transposed(adapter.module(m, "mlp_out", layer)) else dense


def second_moment(m, c: EditContext, layer: int) -> torch.Tensor:
    return c.second_moments(m, tok(), [layer], n_tokens=N_TOKENS)[layer].mean.double()


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> None:
    err = float((a - b).norm())
    scale = float(b.norm()) + 1e-12
    assert err <= rtol * scale, f"relative error {err / scale:.3e} > {rtol}"


def apply_revert_exact(m, delta) -> None:
    before = snapshot(m)
    delta.apply(m)
    assert not unchanged(m, before)
    delta.revert(m)
    assert unchanged(m, before)


def numpy_ridge_delta(K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, lam: float) -> torch.Tensor:
    """MEMIT's Δ = R Kᵀ(λC + KKᵀ)⁻¹ (Meng et al. 2023, eq. 14) recomputed in NumPy float64, on C's live eigenspace
    (eigenvalues > DEAD_RTOL·max; the whole space when nothing is dead) -- independent of kedit.core.solve."""
    Kn, Rn, Cn = (t.double().numpy() for t in (K, R, C))
    s, U = np.linalg.eigh(0.5 * (Cn + Cn.T))
    U = U[:, s > DEAD_RTOL * s.max()]
    UK = U.T @ Kn
    return torch.from_numpy(Rn @ UK.T @ np.linalg.solve(lam * (U.T @ Cn @ U) + UK @ UK.T, U.T))
