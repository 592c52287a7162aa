"""UltraEdit (Gu et al., arXiv 2505.14679): the lifelong normaliser's running statistics, derived from the applied
deltas, equal a one-shot mean / unbiased variance over every turn's features; they are rolled back with the weights
(bitwise); the update is the closed-form ridge Vᵀ K (KᵀK + ridge·I)⁻¹ on the normalised pseudo values (recomputed
in NumPy); the default layers are the reference's two below the top; bad settings are refused."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from lte_common import REQS, apply_revert_exact, ctx, math_delta, model, snapshot, tok, unchanged

from kedit.methods.registry import get_method
from kedit.methods.ultraedit import RunningStats, default_layers, running_stats, ultraedit_features
from kedit.requests import EditRequest

STREAM = [*REQS, EditRequest("{} was born in", "Danielle Darrieux", "Tokyo", case_id="c")]
LAYERS = (1, 2)


def _cfg(**kw):
    return get_method("ultraedit").make_config({"layers": LAYERS, **kw})


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_ultraedit_running_stats_equal_one_shot_and_roll_back(arch):
    m = model(arch)
    spec = get_method("ultraedit")
    c = ctx()
    base = snapshot(m)
    rows = {l: [] for l in LAYERS}
    deltas, memos = [], []
    try:
        for r in STREAM:
            feats = ultraedit_features(m, tok(), [r], LAYERS)  # what this turn sees, independently recollected
            for l in LAYERS:
                rows[l].append(torch.cat(feats[l], dim=1).double())
            d = spec.compute(m, tok(), [r], _cfg(), c)
            deltas.append(d.apply(m))
            stats, n = running_stats(m, c, LAYERS)
            memos.append(stats)
            assert n == len(deltas)
        for l in LAYERS:
            z = torch.cat(rows[l])
            s = memos[-1][l]
            assert s.n == z.shape[0]
            assert torch.allclose(s.mean, z.mean(0), rtol=1e-10, atol=1e-12)
            assert torch.allclose(s.std, z.std(0), rtol=1e-9, atol=1e-12)
        # revert the newest turn: the statistics are those after the previous turn, bitwise
        deltas.pop().revert(m)
        stats, n = running_stats(m, c, LAYERS)
        assert n == 2
        for l in LAYERS:
            assert torch.equal(stats[l].mean, memos[1][l].mean) and torch.equal(stats[l].m2, memos[1][l].m2)
    finally:
        for d in reversed(deltas):
            d.revert(m)
    assert unchanged(m, base)
    stats, n = running_stats(m, c, LAYERS)
    assert n == 0 and all(stats[l] is None for l in LAYERS)


def test_ultraedit_update_is_the_normalised_ridge_solve():
    m = model("gpt2")
    cfg = _cfg(lr=1e-2, ridge=0.5)
    before = snapshot(m)
    delta = get_method("ultraedit").compute(m, tok(), REQS, cfg, ctx())
    assert unchanged(m, before)
    feats = ultraedit_features(m, tok(), REQS, LAYERS)
    for l in LAYERS:
        K, G = (t.double().numpy() for t in feats[l])
        z = np.concatenate([K, G], 1)
        zh = (z - z.mean(0)) / (z.std(0, ddof=1) + cfg.eps)
        kh, gh = zh[:, : K.shape[1]], zh[:, K.shape[1] :]
        V = -cfg.lr * (kh * kh).sum(-1, keepdims=True) * gh
        want = V.T @ K @ np.linalg.inv(K.T @ K + cfg.ridge * np.eye(K.shape[1]))
        got = math_delta(m, delta, l)
        assert np.linalg.norm(got.numpy() - want) <= 1e-5 * np.linalg.norm(want)
    apply_revert_exact(m, delta)
    # the edit moves the model towards the targets: the edit loss drops
    from kedit.methods.ft.objective import build_loss_batches, request_losses

    (batch,) = build_loss_batches(tok(), REQS, "target_new", torch.device("cpu"))
    with torch.no_grad():
        loss0 = request_losses(m(input_ids=batch.ids, attention_mask=batch.mask).logits, batch).sum()
        with delta.applied(m):
            loss1 = request_losses(m(input_ids=batch.ids, attention_mask=batch.mask).logits, batch).sum()
    assert loss1 < loss0


def test_running_stats_merge_is_exact_and_defaults_are_the_papers():
    z = torch.randn(40, 7, dtype=torch.float64)
    merged = RunningStats.of(z[:5]).merge(RunningStats.of(z[5:23])).merge(RunningStats.of(z[23:]))
    assert merged.n == 40
    assert torch.allclose(merged.mean, z.mean(0)) and torch.allclose(merged.std, z.std(0))
    assert default_layers(32) == (29, 30) and default_layers(28) == (25, 26) and default_layers(6) == (3, 4)
    assert get_method("ultraedit").default_config(model("gpt2")).layers is None


def test_ultraedit_bad_settings_are_refused():
    m = model("gpt2")
    with pytest.raises(ValueError, match="lr must be"):
        get_method("ultraedit").compute(m, tok(), REQS, _cfg(lr=0.0), ctx())
    with pytest.raises(ValueError, match="layers must be"):
        get_method("ultraedit").compute(m, tok(), REQS, _cfg(layers=(99,)), ctx())
