"""Least-squares solves shared by the locate-then-edit methods, written once and done in float64.

Math orientation throughout: ``W ∈ R^{d × d_k}``, keys ``K ∈ R^{d_k × n}`` (columns), residuals ``R ∈ R^{d × n}``.
Every function returns the update as low-rank factors or a dense matrix in float64; callers cast.
"""

from __future__ import annotations

import torch

__all__ = ["SingularSystemError", "solve_spd", "rome_rank_one", "ridge_update"]


class SingularSystemError(RuntimeError):
    """A linear system is singular or ill-conditioned (often: missing or degenerate statistics)."""


def solve_spd(A: torch.Tensor, B: torch.Tensor, *, what: str = "system") -> torch.Tensor:
    """Solve ``A X = B`` for symmetric positive (semi)definite ``A`` in float64.

    Uses a Cholesky factorisation; if ``A`` is not numerically positive definite, falls back to a general LU
    solve, and raises :class:`SingularSystemError` (naming ``what``) if that fails or yields non-finite values.
    """
    A64, B64 = A.double(), B.double()
    vec = B64.ndim == 1
    B2 = B64[:, None] if vec else B64
    L, info = torch.linalg.cholesky_ex(A64)
    diag = L.diagonal().abs() if int(info) == 0 else None
    if diag is not None and float(diag.min()) > 1e-7 * float(diag.max()):
        X = torch.cholesky_solve(B2, L)
    else:
        evals = torch.linalg.eigvalsh(A64)
        top = float(evals.abs().max())
        low = float(evals.min())
        if top == 0.0 or low <= 1e-12 * top:
            raise SingularSystemError(
                f"{what} is singular (eigenvalues in [{low:.3e}, {top:.3e}]); usually the statistics are "
                "missing or computed on too few tokens"
            )
        X = torch.linalg.solve(A64, B2)
    X = X[:, 0] if vec else X
    if not torch.isfinite(X).all():
        raise SingularSystemError(f"{what} is singular or ill-conditioned (non-finite solution)")
    return X


def rome_rank_one(
    C: torch.Tensor | None,
    k_star: torch.Tensor,
    k_e: torch.Tensor,
    residual: torch.Tensor,
    *,
    ridge: float = 0.0,
    what: str = "ROME",
) -> tuple[torch.Tensor, torch.Tensor]:
    """ROME's rank-one update (Meng et al. 2022, eq. 2 in its code form).

    ``u = C⁻¹k* / ‖C⁻¹k*‖`` (``C = I`` when ``C is None``), ``r = residual / (uᵀ k_e)``; the update is
    ``Δ = r uᵀ`` so that ``(W + Δ) k_e = W k_e + residual``. Returns ``(r [d], u [d_k])`` in float64.
    """
    k_star64, k_e64 = k_star.double(), k_e.double()
    if C is None:
        u = k_star64.clone()
    else:
        A = C.double()
        if ridge:
            A = A + ridge * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        u = solve_spd(A, k_star64, what=f"{what} covariance solve")
    norm = u.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise SingularSystemError(f"{what}: C⁻¹k* is zero or non-finite")
    u = u / norm
    denom = u @ k_e64
    if denom.abs() < 1e-12 * k_e64.norm().clamp_min(1e-30):
        raise SingularSystemError(f"{what}: uᵀk_e ≈ 0 ({float(denom):.3e}); the edit key is orthogonal to u")
    return residual.double() / denom, u


def ridge_update(
    K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, lam: float, *, what: str = "ridge"
) -> torch.Tensor:
    """MEMIT's solve ``Δ = R Kᵀ (λC + K Kᵀ)⁻¹`` (Meng et al. 2023, eq. 14), the minimiser of
    ``‖ΔK − R‖² + λ tr(Δ C Δᵀ)``. Returns ``Δ [d, d_k]`` in float64.
    """
    K64, R64 = K.double(), R.double()
    A = lam * C.double() + K64 @ K64.T
    # Δ A = R Kᵀ  ⇔  A Δᵀ = K Rᵀ (A symmetric)
    return solve_spd(A, K64 @ R64.T, what=what).T
