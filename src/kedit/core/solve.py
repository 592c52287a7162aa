"""Least-squares solves shared by the locate-then-edit methods, written once and done in float64.

Math orientation throughout: ``W ∈ R^{d × d_k}``, keys ``K ∈ R^{d_k × n}`` (columns), residuals ``R ∈ R^{d × n}``.
Every function returns the update as low-rank factors or a dense matrix in float64; callers cast.
"""

from __future__ import annotations

import torch

__all__ = [
    "NULLSPACE_MODES",
    "SingularSystemError",
    "emmet_update_factors",
    "nullspace_basis",
    "nullspace_projector",
    "projected_update_factors",
    "ridge_update",
    "ridge_update_factors",
    "rome_rank_one",
    "solve_spd",
]


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


def ridge_update_factors(
    K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, lam: float, *, what: str = "ridge"
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ridge_update` as rank-``n`` factors: ``Δ = left @ right`` with ``left = R`` ``[d, n]`` and
    ``right = ((λC + K Kᵀ)⁻¹ K)ᵀ`` ``[n, d_k]`` (the reference's ``(resid, adj_k)`` pair, Meng et al. 2023).

    Used by MEMIT and PMET (Li et al., AAAI 2024), which differ only in how the caller spreads ``R`` over layers.
    Raises :class:`SingularSystemError` (naming ``what``) when ``λC + K Kᵀ`` is singular.
    """
    K64 = K.double()
    A = lam * C.to(device=K64.device, dtype=torch.float64) + K64 @ K64.T
    adj = solve_spd(A, K64, what=what)  # [d_k, n]
    return R.to(device=K64.device, dtype=torch.float64), adj.T


#: how :func:`nullspace_basis` reads its threshold τ
NULLSPACE_MODES = ("absolute", "relative", "energy")


def nullspace_basis(C: torch.Tensor, threshold: float, *, mode: str = "absolute") -> torch.Tensor:
    """Orthonormal basis ``U_s`` ``[d_k, m]`` of the approximate null space of the key second moment ``C``
    (AlphaEdit, Fang et al., ICLR 2025): the eigenvectors of ``C = U S Uᵀ`` whose eigenvalue is "small".

    ``mode`` decides what small means:

    * ``"absolute"`` -- ``S_i < τ`` (the paper and reference code, τ = 2e-2 on ``C = E[k kᵀ]``; model- and
      scale-specific, see AlphaEdit #26/#38);
    * ``"relative"`` -- ``S_i < τ · max(S)``;
    * ``"energy"`` -- the smallest eigenvalues whose sum is at most ``τ · Σ S`` (the author's energy-ratio
      suggestion, AlphaEdit #38), e.g. τ = 0.01 keeps the directions holding 1 % of the key energy.

    Computed with ``eigh`` in float64 (``C`` is symmetric PSD, so this equals the reference's SVD). The projector
    is ``P = U_s U_sᵀ`` (:func:`nullspace_projector`); ``m = 0`` (nothing small) is returned as an empty basis --
    callers decide whether that is an error.
    """
    if mode not in NULLSPACE_MODES:
        raise ValueError(f"null-space mode must be one of {NULLSPACE_MODES}, got {mode!r}")
    if not threshold > 0:
        raise ValueError(f"null-space threshold must be > 0, got {threshold}")
    C64 = C.double()
    C64 = 0.5 * (C64 + C64.T)
    evals, evecs = torch.linalg.eigh(C64)  # ascending
    if mode == "absolute":
        keep = evals < threshold
    elif mode == "relative":
        keep = evals < threshold * evals.abs().max()
    else:
        energy = evals.clamp_min(0).cumsum(0)
        keep = energy <= threshold * energy[-1]
    return evecs[:, keep].contiguous()


def nullspace_projector(C: torch.Tensor, threshold: float, *, mode: str = "absolute") -> torch.Tensor:
    """AlphaEdit's projector ``P = U_s U_sᵀ`` ``[d_k, d_k]`` onto the approximate null space of ``C`` (see
    :func:`nullspace_basis`)."""
    U = nullspace_basis(C, threshold, mode=mode)
    return U @ U.T


def projected_update_factors(
    K: torch.Tensor,
    R: torch.Tensor,
    basis: torch.Tensor,
    alpha: float,
    *,
    prev_kkt: torch.Tensor | None = None,
    what: str = "null-space solve",
) -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaEdit's null-space-constrained update (Fang et al., ICLR 2025, eq. 11) as rank-``n`` factors.

    The reference solves ``X = (P A + αI)⁻¹ P K Rᵀ``, ``Δ = Xᵀ`` with ``A = K Kᵀ + K_p K_pᵀ`` (``prev_kkt`` is the
    accumulated ``K_p K_pᵀ`` of earlier edits) and ``P = U_s U_sᵀ``. Because ``P (A P + αI)⁻¹ = U_s (U_sᵀ A U_s +
    αI)⁻¹ U_sᵀ``, the same Δ is obtained from the symmetric ``m × m`` system in the null-space basis::

        Δ = R · [U_s (U_sᵀ A U_s + α I)⁻¹ U_sᵀ K]ᵀ = left @ right,   left = R [d, n], right [n, d_k]

    It minimises ``‖ΔPK − R‖² + ‖ΔPK_p‖² + α‖ΔP‖²`` and satisfies ``Δ(I − P) = 0`` exactly: Δ never touches the
    preserved-key subspace. Raises :class:`SingularSystemError` for an empty null space or a singular system
    (``α = 0`` with too few keys).
    """
    K64 = K.double()
    dev = K64.device
    U = basis.to(device=dev, dtype=torch.float64)
    if U.ndim != 2 or U.shape[0] != K64.shape[0]:
        raise ValueError(f"{what}: basis must be [d_k={K64.shape[0]}, m], got {tuple(U.shape)}")
    if U.shape[1] == 0:
        raise SingularSystemError(
            f"{what}: the null space is empty (no eigenvalue of C below the threshold), so every update is "
            "projected to zero; raise nullspace_threshold or use nullspace_mode='relative'/'energy'"
        )
    UK = U.T @ K64  # [m, n]
    M = UK @ UK.T
    if prev_kkt is not None:
        M = M + U.T @ prev_kkt.to(device=dev, dtype=torch.float64) @ U
    M = M + alpha * torch.eye(M.shape[0], dtype=M.dtype, device=dev)
    right = U @ solve_spd(M, UK, what=what)  # [d_k, n]
    return R.to(device=dev, dtype=torch.float64), right.T


def emmet_update_factors(
    K: torch.Tensor,
    R: torch.Tensor,
    C: torch.Tensor,
    lam: float,
    *,
    mu: float = 0.0,
    ridge: float = 0.1,
    what: str = "EMMET solve",
) -> tuple[torch.Tensor, torch.Tensor]:
    """EMMET's equality-constrained update (Gupta, Sajnani, Anumanchipalli, "A Unified Framework for Model
    Editing", 2024) as rank-``n`` factors.

    Minimises ``tr(Δ C̃ Δᵀ)`` subject to ``Δ K = R`` with ``C̃ = λC + μI``; with the ridge ``λ_E`` on the
    constraint Gram matrix, ``D = Kᵀ C̃⁻¹ K + λ_E I`` and ``Δ = R D⁻¹ Kᵀ C̃⁻¹``, i.e. ``left = R D⁻¹`` ``[d, n]`` and
    ``right = (C̃⁻¹ K)ᵀ`` ``[n, d_k]``. With ``ridge = 0`` the constraint holds exactly: ``Δ K = R`` (needs
    ``n ≤ d_k`` and independent keys, else :class:`SingularSystemError`).
    """
    K64 = K.double()
    dev = K64.device
    Ct = lam * C.to(device=dev, dtype=torch.float64)
    if mu:
        Ct = Ct + mu * torch.eye(Ct.shape[0], dtype=Ct.dtype, device=dev)
    Y = solve_spd(Ct, K64, what=f"{what} (preservation matrix λC + μI)")  # C̃⁻¹K  [d_k, n]
    D = K64.T @ Y
    D = 0.5 * (D + D.T) + ridge * torch.eye(D.shape[0], dtype=D.dtype, device=dev)
    left = solve_spd(D, R.to(device=dev, dtype=torch.float64).T, what=f"{what} (constraint Gram KᵀC̃⁻¹K)").T
    return left, Y.T
