"""Golden tests of the least-squares solves on random matrices (MEMIT §3, AlphaEdit §6, EMMET §7 of METHODS.md)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from kedit.core.config import auto_layers
from kedit.core.solve import (
    SingularSystemError,
    emmet_update_factors,
    nullspace_basis,
    nullspace_projector,
    projected_update_factors,
    ridge_update,
    ridge_update_factors,
)
from kedit.core.walk import spread_fraction, spread_stages
from kedit.methods.blue import blue_stages, plan_stages

D, DK, N = 6, 12, 3


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _problem(seed=0, n=N):
    K = _rand(DK, n, seed=seed)
    R = _rand(D, n, seed=seed + 1)
    X = _rand(DK, 4 * DK, seed=seed + 2)
    C = X @ X.T / X.shape[1]  # full-rank uncentred second moment
    return K, R, C


def _dense(f):
    left, right = f
    return left @ right


def test_memit_normal_equations_and_factors_match_dense():
    K, R, C = _problem()
    lam = 3.0
    delta = _dense(ridge_update_factors(K, R, C, lam))
    assert torch.allclose(delta @ (lam * C + K @ K.T), R @ K.T, atol=1e-10)
    assert torch.allclose(delta, ridge_update(K, R, C, lam), atol=1e-12)
    assert torch.linalg.matrix_rank(delta).item() <= N


def test_memit_small_lambda_reaches_targets():
    K, R, C = _problem()
    delta = _dense(ridge_update_factors(K, R, C, 1e-9))
    assert torch.allclose(delta @ K, R, atol=1e-6)


def test_memit_single_edit_closed_form():
    K, R, C = _problem(n=1)
    lam = 2.5
    delta = _dense(ridge_update_factors(K, R, C, lam))
    k = K[:, 0]
    s = k @ torch.linalg.solve(lam * C, k)
    assert torch.allclose(delta @ k, R[:, 0] * s / (1 + s), atol=1e-10)


def test_memit_singular_named():
    K, R, _ = _problem()
    with pytest.raises(SingularSystemError, match="layer 7"):
        ridge_update_factors(K, R, torch.zeros(DK, DK, dtype=torch.float64), 1.0, what="MEMIT layer 7")


def _low_rank_keys(rank=5, n0=200, seed=3):
    B = _rand(DK, rank, seed=seed)
    K0 = B @ _rand(rank, n0, seed=seed + 1)
    return K0, K0 @ K0.T / n0


@pytest.mark.parametrize("mode,tau", [("absolute", 1e-8), ("relative", 1e-10), ("energy", 1e-12)])
def test_nullspace_of_low_rank_keys(mode, tau):
    K0, C = _low_rank_keys()
    U = nullspace_basis(C, tau, mode=mode)
    assert U.shape == (DK, DK - 5)
    assert torch.allclose(U.T @ U, torch.eye(DK - 5, dtype=torch.float64), atol=1e-10)
    P = nullspace_projector(C, tau, mode=mode)
    assert torch.allclose(P @ K0, torch.zeros_like(K0), atol=1e-8)


def test_nullspace_modes_and_thresholds():
    _, _, C = _problem()
    evals = torch.linalg.eigvalsh(C)
    assert nullspace_basis(C, float(evals[2]) + 1e-12).shape[1] == 3  # absolute: S_i < τ
    assert nullspace_basis(C, float(evals[0]) / 2).shape[1] == 0
    assert nullspace_basis(C, 1.0 + 1e-9, mode="relative").shape[1] == DK
    frac = float(evals[:4].sum() / evals.sum())
    assert nullspace_basis(C, frac + 1e-12, mode="energy").shape[1] == 4
    with pytest.raises(ValueError, match="mode"):
        nullspace_basis(C, 0.1, mode="bogus")


def test_alphaedit_annihilates_preserved_keys_and_normal_equations():
    K0, C = _low_rank_keys()
    U = nullspace_basis(C, 1e-8)
    P = U @ U.T
    K, R, _ = _problem(seed=10)
    Kp = _rand(DK, 2, seed=20)
    alpha = 0.7
    delta = _dense(projected_update_factors(K, R, U, alpha, prev_kkt=Kp @ Kp.T))
    I = torch.eye(DK, dtype=torch.float64)
    assert torch.allclose(delta @ (I - P), torch.zeros_like(delta), atol=1e-10)
    assert torch.allclose(delta @ K0, torch.zeros(D, K0.shape[1], dtype=torch.float64), atol=1e-8)
    A = K @ K.T + Kp @ Kp.T
    assert torch.allclose(delta @ (P @ A @ P + alpha * P), R @ K.T @ P, atol=1e-10)
    # the reference's form: X = (P A + αI)⁻¹ P K Rᵀ, Δ = Xᵀ
    X = torch.linalg.solve(P @ A + alpha * I, P @ K @ R.T)
    assert torch.allclose(delta, X.T, atol=1e-10)
    assert torch.linalg.matrix_rank(delta).item() <= N


def test_alphaedit_empty_nullspace_and_singular():
    K, R, _ = _problem()
    with pytest.raises(SingularSystemError, match="null space is empty"):
        projected_update_factors(K, R, torch.zeros(DK, 0, dtype=torch.float64), 1.0)
    U = torch.eye(DK, dtype=torch.float64)
    with pytest.raises(SingularSystemError, match="layer 3"):
        projected_update_factors(K, R, U, 0.0, what="AlphaEdit layer 3")  # KKᵀ is rank 3 < DK


def test_emmet_equality_constraint_and_ridge():
    K, R, C = _problem()
    delta = _dense(emmet_update_factors(K, R, C, 5.0, ridge=0.0))
    assert torch.allclose(delta @ K, R, atol=1e-9)
    # it is the minimum-C-norm solution: any other solution of ΔK = R costs more
    other = delta + _rand(D, DK, seed=9) @ (torch.eye(DK, dtype=torch.float64) - K @ torch.linalg.pinv(K))
    assert torch.allclose(other @ K, R, atol=1e-9)
    assert torch.trace(delta @ C @ delta.T) < torch.trace(other @ C @ other.T)
    # with the ridge the constraint is relaxed; μ adds an identity term
    loose = _dense(emmet_update_factors(K, R, C, 5.0, ridge=0.1))
    assert not torch.allclose(loose @ K, R, atol=1e-6)
    with_mu = _dense(emmet_update_factors(K, R, C, 5.0, mu=1.0, ridge=0.0))
    assert torch.allclose(with_mu @ K, R, atol=1e-9)
    dup = torch.cat([K[:, :1], K[:, :1]], 1)
    with pytest.raises(SingularSystemError, match="EMMET layer 2"):
        emmet_update_factors(dup, R[:, :2], C, 5.0, ridge=0.0, what="EMMET layer 2")


def test_spread_rules_and_plans():
    assert [spread_fraction("linear", j, 4) for j in range(4)] == [1 / 4, 1 / 3, 1 / 2, 1.0]
    assert [spread_fraction("sqrt", j, 4) for j in range(4)] == pytest.approx([0.5, 3**-0.5, 2**-0.5, 1.0])
    st = spread_stages([2, 3, 5], "linear")
    assert [s.target_layer for s in st] == [5, 5, 5] and [s.retarget for s in st] == [True, False, False]
    assert [(s.layer, s.target_layer, s.fraction, s.retarget) for s in blue_stages([2, 3, 5])] == [
        (2, 2, 1.0, True),
        (5, 5, 1.0, True),
    ]
    assert len(plan_stages([4], "blue", "linear")) == 1
    with pytest.raises(ValueError, match="strategy"):
        plan_stages([1, 2], "bogus", "linear")
    assert auto_layers(48) == (10, 11, 12, 13, 14) and auto_layers(4) == (0, 1) and auto_layers(2) == (0,)
    # one function for every method: the single layer of ROME and EMMET is a quarter of the depth, inside the model
    for n in range(1, 60):
        (single,) = auto_layers(n, count=1, last_at=0.25)
        assert single == max(0, min(n - 1, round(0.25 * (n - 1))))
        multi = auto_layers(n)
        assert list(multi) == list(range(multi[0], multi[-1] + 1)) and 0 <= multi[0] and multi[-1] < n
    with pytest.raises(ValueError, match="count"):
        auto_layers(3, count=4)
