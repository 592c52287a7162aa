"""Golden tests of the least-squares solves on random matrices (MEMIT §3, AlphaEdit §6, EMMET §7 of METHODS.md):
each solve against an independent NumPy float64 closed form written from its paper, the dead-direction handling
(pseudo-inverse on C's dead eigenspace), dtype and device handling."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

from kedit.core.config import auto_layers
from kedit.core.solve import (
    DEAD_RTOL,
    SingularSystemError,
    emmet_update_factors,
    live_spectrum,
    nullspace_basis,
    nullspace_projector,
    projected_update_factors,
    ridge_update,
    ridge_update_factors,
    rome_rank_one,
    solve_spd,
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


# -- golden tests against NumPy closed forms written from the papers ------------------------------------------------
def _np(*ts):
    return [t.detach().cpu().double().numpy() for t in ts]


def _np_spd(n, seed, lowest=None):
    """A random SPD ``[n, n]`` with eigenvalues in [0.5, 4] (or ``lowest`` planted as the smallest ones)."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = rng.uniform(0.5, 4.0, n)
    if lowest is not None:
        s[: len(lowest)] = lowest
    return (Q * s) @ Q.T, Q, s


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


@pytest.mark.parametrize("same_key", [True, False])
def test_rome_golden(same_key):
    """ROME (Meng et al. 2022, eq. 2): Δ = (v* − W k)(C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k) and (W + Δ) k = v*."""
    rng = np.random.default_rng(1)
    C, _, _ = _np_spd(DK, 2)
    W = rng.standard_normal((D, DK))
    k_star = rng.standard_normal(DK)
    k_e = k_star if same_key else k_star + 0.3 * rng.standard_normal(DK)
    v_star = rng.standard_normal(D)
    c_inv_k = np.linalg.solve(C, k_star)
    expected = np.outer(v_star - W @ k_e, c_inv_k) / (c_inv_k @ k_e)
    r, u = rome_rank_one(_t(C), _t(k_star), _t(k_e), _t(v_star - W @ k_e))
    got = torch.outer(r, u).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose((W + got) @ k_e, v_star, rtol=0, atol=1e-12)
    # C = None is C = I; a ridge is (C + ridge·I)⁻¹
    r, u = rome_rank_one(None, _t(k_star), _t(k_e), _t(v_star - W @ k_e))
    np.testing.assert_allclose(torch.outer(r, u).numpy(), np.outer(v_star - W @ k_e, k_star) / (k_star @ k_e),
                               atol=1e-12)
    c_inv_k = np.linalg.solve(C + 0.3 * np.eye(DK), k_star)
    r, u = rome_rank_one(_t(C), _t(k_star), _t(k_e), _t(v_star - W @ k_e), ridge=0.3)
    np.testing.assert_allclose(torch.outer(r, u).numpy(), np.outer(v_star - W @ k_e, c_inv_k) / (c_inv_k @ k_e),
                               atol=1e-12)


def test_memit_golden():
    """MEMIT (Meng et al. 2023, eq. 14): Δ = R Kᵀ (λC + K Kᵀ)⁻¹."""
    rng = np.random.default_rng(3)
    C, _, _ = _np_spd(DK, 4)
    K, R = rng.standard_normal((DK, N)), rng.standard_normal((D, N))
    for lam in (0.01, 3.0, 200.0):
        expected = R @ K.T @ np.linalg.inv(lam * C + K @ K.T)
        np.testing.assert_allclose(ridge_update(_t(K), _t(R), _t(C), lam).numpy(), expected, atol=1e-12)
        np.testing.assert_allclose(_dense(ridge_update_factors(_t(K), _t(R), _t(C), lam)).numpy(), expected,
                                   atol=1e-12)


def test_emmet_golden():
    """EMMET (Gupta et al. 2024): Δ = R (Kᵀ C̃⁻¹ K + λ_E I)⁻¹ Kᵀ C̃⁻¹ with C̃ = λC + μI; ΔK = R exactly for λ_E = 0."""
    rng = np.random.default_rng(5)
    C, _, _ = _np_spd(DK, 6)
    K, R = rng.standard_normal((DK, N)), rng.standard_normal((D, N))
    for lam, mu, ridge in ((5.0, 0.0, 0.0), (5.0, 1.0, 0.0), (0.5, 0.0, 0.1), (2.0, 0.3, 0.05)):
        Ct_inv = np.linalg.inv(lam * C + mu * np.eye(DK))
        expected = R @ np.linalg.inv(K.T @ Ct_inv @ K + ridge * np.eye(N)) @ K.T @ Ct_inv
        got = _dense(emmet_update_factors(_t(K), _t(R), _t(C), lam, mu=mu, ridge=ridge)).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-12)
        if ridge == 0.0:
            np.testing.assert_allclose(got @ K, R, atol=1e-12)


def test_alphaedit_golden():
    """AlphaEdit (Fang et al., ICLR 2025, eq. 15 with the L2 weight α): Δ = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + α I)⁻¹,
    P = U Uᵀ the projector on the null space of the preserved keys' K₀K₀ᵀ; Δ(I − P) = 0."""
    rng = np.random.default_rng(7)
    B = rng.standard_normal((DK, 5))
    K0 = B @ rng.standard_normal((5, 300))
    C0 = K0 @ K0.T / K0.shape[1]
    evals, evecs = np.linalg.eigh(C0)
    U = evecs[:, evals < 1e-8 * evals.max()]
    assert U.shape[1] == DK - 5
    P = U @ U.T
    K, R, Kp = rng.standard_normal((DK, N)), rng.standard_normal((D, N)), rng.standard_normal((DK, 2))
    for alpha in (0.1, 1.0, 10.0):
        expected = R @ K.T @ P @ np.linalg.inv(Kp @ Kp.T @ P + K @ K.T @ P + alpha * np.eye(DK))
        got = _dense(projected_update_factors(_t(K), _t(R), _t(U), alpha, prev_kkt=_t(Kp @ Kp.T))).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-12)
        np.testing.assert_allclose(got @ (np.eye(DK) - P), 0.0, atol=1e-12)
        np.testing.assert_allclose(got @ K0, 0.0, atol=1e-9)


# -- dead directions of C -------------------------------------------------------------------------------------------
def _dead_problem(seed=11, dead=(0.0, 0.0, 1e-13)):
    """A random C with planted (near-)zero eigenvalues, keys that reach every direction (the dead ones a little)."""
    C, Q, s = _np_spd(DK, seed, lowest=list(dead))
    rng = np.random.default_rng(seed + 1)
    K, R = rng.standard_normal((DK, N)), rng.standard_normal((D, N))
    U_dead, U_live, S_live = Q[:, : len(dead)], Q[:, len(dead):], s[len(dead):]
    return C, K, R, U_dead, U_live, S_live


def _all_solves(C, K, R, lam=2.0):
    """``{name: Δ [d, d_k]}`` of every covariance-weighted solve, as NumPy."""
    tC, tK, tR = _t(C), _t(K), _t(R)
    out = {
        "ridge_update": ridge_update(tK, tR, tC, lam),
        "ridge_update_factors": _dense(ridge_update_factors(tK, tR, tC, lam)),
        "emmet": _dense(emmet_update_factors(tK, tR, tC, lam, ridge=0.0)),
        "emmet_mu_ridge": _dense(emmet_update_factors(tK, tR, tC, lam, mu=0.5, ridge=0.1)),
    }
    r, u = rome_rank_one(tC, tK[:, 0], tK[:, 1], tR[:, 0])
    out["rome"] = torch.outer(r, u)
    return {k: v.numpy() for k, v in out.items()}


def test_dead_directions_get_no_update():
    C, K, R, U_dead, U_live, S_live = _dead_problem()
    spec = live_spectrum(_t(C))
    assert spec is not None and spec[1].shape == (DK, DK - 3)
    np.testing.assert_allclose(np.abs(spec[1].numpy().T @ U_dead), 0.0, atol=1e-10)
    for name, delta in _all_solves(C, K, R).items():
        assert np.abs(delta @ U_dead).max() <= 1e-10, name
        assert np.abs(delta).max() > 1e-3, name  # but not a zero update
    # the restricted forms, written independently in the live eigenbasis (Δ = Δ' U_lᵀ)
    lam = 2.0
    UK = U_live.T @ K
    memit = R @ UK.T @ np.linalg.inv(lam * np.diag(S_live) + UK @ UK.T) @ U_live.T
    Ct_pinv = U_live @ np.diag(1 / (lam * S_live)) @ U_live.T
    emmet = R @ np.linalg.inv(K.T @ Ct_pinv @ K) @ K.T @ Ct_pinv
    c_pinv_k = U_live @ ((U_live.T @ K[:, 0]) / S_live)
    rome = np.outer(R[:, 0], c_pinv_k) / (c_pinv_k @ K[:, 1])
    got = _all_solves(C, K, R, lam)
    np.testing.assert_allclose(got["ridge_update"], memit, atol=1e-10)
    np.testing.assert_allclose(got["ridge_update_factors"], memit, atol=1e-10)
    np.testing.assert_allclose(got["emmet"], emmet, atol=1e-10)
    np.testing.assert_allclose(got["emmet"] @ K, R, atol=1e-10)  # the equality constraint still holds
    np.testing.assert_allclose(got["rome"], rome, atol=1e-10)
    np.testing.assert_allclose(got["rome"] @ K[:, 1], R[:, 0], atol=1e-10)


def test_dead_directions_are_what_blew_the_update_up():
    """With a tiny (not zero) planted eigenvalue the unrestricted MEMIT formula routes the residual through it;
    the restricted solve does not."""
    C, K, R, U_dead, _, _ = _dead_problem(dead=(1e-9,))
    lam = 2.0
    old = R @ K.T @ np.linalg.inv(lam * C + K @ K.T)
    new = _dense(ridge_update_factors(_t(K), _t(R), _t(C), lam)).numpy()
    assert np.linalg.norm(old @ U_dead) > 0.5 * np.linalg.norm(old)
    assert np.linalg.norm(new) < 0.5 * np.linalg.norm(old)


def test_full_rank_C_keeps_the_paper_formulas():
    """A full-rank C gives the unrestricted formulas, also when its smallest eigenvalue lies just above the
    threshold (where the cheap Cholesky bound fails and the eigendecomposition decides)."""
    for near in (False, True):
        C, Q, s = _np_spd(DK, 13)
        if near:  # between the threshold and the cheap bound τ = dead_rtol·‖C‖_∞ ≥ dead_rtol·λ_max
            bound = np.abs(C).sum(1).max()
            assert bound > 1.01 * s.max()
            s[0] = DEAD_RTOL * 0.5 * (s.max() + bound)
            C = (Q * s) @ Q.T
        assert live_spectrum(_t(C)) is None  # nothing dead, also just above the threshold
        rng = np.random.default_rng(14)
        K, R = rng.standard_normal((DK, N)), rng.standard_normal((D, N))
        lam = 2.0
        got = _all_solves(C, K, R, lam)
        Ci = np.linalg.inv(C)
        np.testing.assert_allclose(got["ridge_update"], R @ K.T @ np.linalg.inv(lam * C + K @ K.T), atol=1e-8)
        np.testing.assert_allclose(got["emmet"], R @ np.linalg.inv(K.T @ Ci @ K) @ K.T @ Ci,
                                   rtol=1e-6, atol=1e-8)
        cik = Ci @ K[:, 0]
        np.testing.assert_allclose(got["rome"], np.outer(R[:, 0], cik) / (cik @ K[:, 1]), atol=1e-8)


def test_degenerate_statistics_still_raise():
    C, K, R, *_ = _dead_problem(dead=(0.0,) * (DK // 2 + 1))
    with pytest.raises(SingularSystemError, match="MEMIT layer 4"):
        ridge_update_factors(_t(K), _t(R), _t(C), 1.0, what="MEMIT layer 4")
    with pytest.raises(SingularSystemError, match="ROME"):
        rome_rank_one(_t(C), _t(K[:, 0]), _t(K[:, 0]), _t(R[:, 0]))
    with pytest.raises(SingularSystemError, match="zero"):
        emmet_update_factors(_t(K), _t(R), torch.zeros(DK, DK, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="dead_rtol"):
        live_spectrum(_t(C), -1.0)


# -- dtype and device ---------------------------------------------------------------------------------------------
def _mixed_inputs(key_dtype):
    """C in float32 (as StatsCache may hold it), keys/residuals in ``key_dtype``; and the float64 NumPy copies of the
    very values the solves see."""
    C, K, R, *_ = _dead_problem(dead=(0.0,))
    C32 = _t(C).float()
    K_ = _t(K).to(key_dtype)
    R_ = _t(R).to(key_dtype)
    return (C32, K_, R_), _np(C32, K_, R_)


@pytest.mark.parametrize("key_dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_mixed_dtypes(key_dtype):
    (C, K, R), (nC, nK, nR) = _mixed_inputs(key_dtype)
    ref = _all_solves(nC, nK, nR)
    tC = C
    got = {
        "ridge_update": ridge_update(K, R, tC, 2.0),
        "ridge_update_factors": _dense(ridge_update_factors(K, R, tC, 2.0)),
        "emmet": _dense(emmet_update_factors(K, R, tC, 2.0, ridge=0.0)),
        "emmet_mu_ridge": _dense(emmet_update_factors(K, R, tC, 2.0, mu=0.5, ridge=0.1)),
    }
    r, u = rome_rank_one(tC, K[:, 0], K[:, 1], R[:, 0])
    got["rome"] = torch.outer(r, u)
    for name, t in got.items():
        assert t.dtype == torch.float64, name
        np.testing.assert_allclose(t.numpy(), ref[name], atol=1e-10, err_msg=name)
    U = nullspace_basis(tC, 1e-5, mode="relative").float()
    assert U.shape[1] == 1
    left, right = projected_update_factors(K, R, U, 0.5, prev_kkt=tC)
    assert left.dtype == right.dtype == torch.float64
    A = tC + torch.eye(DK)  # float32, as a caller might pass it
    X = solve_spd(A, K)
    assert X.dtype == torch.float64
    np.testing.assert_allclose(X.numpy(), np.linalg.solve(*_np(A, K)), atol=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_statistics_on_cpu_keys_on_cuda():
    """C as StatsCache holds it (CPU, float32) against keys on the GPU: every solve runs on the keys' device and
    agrees with the CPU result."""
    (C, K, R), _ = _mixed_inputs(torch.float16)
    dev = torch.device("cuda")
    Kc, Rc = K.to(dev), R.to(dev)
    U = nullspace_basis(C, 1e-5, mode="relative")
    calls = {
        "solve_spd": lambda k, r: (solve_spd(C + torch.eye(DK), k),),
        "rome": lambda k, r: rome_rank_one(C, k[:, 0], k[:, 1], r[:, 0], ridge=0.1),
        "rome_identity": lambda k, r: rome_rank_one(None, k[:, 0], k[:, 1], r[:, 0]),
        "ridge_update": lambda k, r: (ridge_update(k, r, C, 2.0),),
        "ridge_update_factors": lambda k, r: ridge_update_factors(k, r, C, 2.0),
        "emmet": lambda k, r: emmet_update_factors(k, r, C, 2.0, mu=0.1, ridge=0.0),
        "projected": lambda k, r: projected_update_factors(k, r, U, 0.5, prev_kkt=C),
    }
    for name, f in calls.items():
        on_gpu, on_cpu = f(Kc, Rc), f(K, R)
        for g, c in zip(on_gpu, on_cpu):
            assert g.device.type == "cuda" and g.dtype == torch.float64, name
            assert torch.allclose(g.cpu(), c, atol=1e-8), name
