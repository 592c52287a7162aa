"""Least-squares solves shared by the locate-then-edit methods, written once and done in float64.

Math orientation throughout: ``W ∈ R^{d × d_k}``, keys ``K ∈ R^{d_k × n}`` (columns), residuals ``R ∈ R^{d × n}``.
Every function moves all of its inputs to the device of the keys (``k_star`` / ``K``; the statistics ``C`` usually
live on the CPU, in float32 or float64), computes in float64 there and returns the update there, as low-rank
factors or a dense matrix in float64; callers cast.

**Dead key directions.** The covariance-weighted solves (:func:`ridge_update`, :func:`ridge_update_factors`,
:func:`emmet_update_factors`, :func:`rome_rank_one`) weight the update by ``C = E[k kᵀ]``. Where ``C`` has
(near-)zero eigenvalues -- MLP units that no token of the statistics corpus activates -- the preservation term
``λ tr(Δ C Δᵀ)`` costs nothing, so the fit routes the residual through them and the update explodes (testbed-gpt2,
MEMIT layer 2, 10 requests: ‖Δ‖ ≈ 8,200 against ‖W‖ = 24, 99.97 % of ‖Δ‖² in the 17 directions with eigenvalue
< 1e-6·max; ‖Δ‖ ≈ 101 with the handling below). These solves therefore act on the *live* eigenspace of ``C`` only:
with ``C = U S Uᵀ`` and ``U_l`` the eigenvectors with ``S_i > dead_rtol · max(S)`` (:data:`DEAD_RTOL`, see
:func:`live_spectrum`), ``C⁻¹`` is replaced by the pseudo-inverse ``U_l S_l⁻¹ U_lᵀ`` and the update is constrained
to ``Δ = Δ' U_lᵀ``, so ``Δ u = 0`` for every dead eigenvector ``u``: no update writes into directions no key of the
corpus reaches. With no dead direction the formulas are the papers' unchanged (same Cholesky solve as before).
AlphaEdit's :func:`projected_update_factors` needs no such handling: it writes *only* into the small-eigenvalue
space of ``C`` by design, and its ``α‖ΔP‖²`` term (α > 0) bounds the update there.
"""

from __future__ import annotations

import torch

__all__ = [
    "DEAD_RTOL",
    "MAX_DEAD_FRACTION",
    "NULLSPACE_MODES",
    "SingularSystemError",
    "emmet_update_factors",
    "nullspace_basis",
    "nullspace_projector",
    "projected_update_factors",
    "ridge_update",
    "live_spectrum",
    "ridge_update_factors",
    "rome_rank_one",
    "solve_spd",
]


class SingularSystemError(RuntimeError):
    """A linear system is singular or ill-conditioned (often: missing or degenerate statistics)."""


#: relative eigenvalue threshold below which a direction of ``C`` is dead (see :func:`live_spectrum`)
DEAD_RTOL = 1e-5
#: more dead directions than this share of ``d_k`` means degenerate statistics, not dead units: an error
MAX_DEAD_FRACTION = 0.5


def _f64(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device=device, dtype=torch.float64)


def solve_spd(A: torch.Tensor, B: torch.Tensor, *, what: str = "system") -> torch.Tensor:
    """Solve ``A X = B`` for symmetric positive (semi)definite ``A`` in float64, on ``B``'s device.

    Uses a Cholesky factorisation; if ``A`` is not numerically positive definite, falls back to a general LU
    solve, and raises :class:`SingularSystemError` (naming ``what``) if that fails or yields non-finite values.
    """
    B64 = B.double()
    A64 = _f64(A, B64.device)
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


def live_spectrum(
    C: torch.Tensor,
    dead_rtol: float = DEAD_RTOL,
    *,
    device: torch.device | str | None = None,
    what: str = "covariance",
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The live eigenpairs ``(S_l [r], U_l [d_k, r])`` of the key second moment ``C`` (float64, on ``device``,
    default ``C``'s), or ``None`` when ``C`` has no dead direction.

    A direction is *dead* when its eigenvalue is ``≤ dead_rtol · max eigenvalue``. The default
    :data:`DEAD_RTOL` ``= 1e-5`` calls a direction dead when the RMS key component along it is below ~0.3 % of that
    along the dominant direction (an update there needs ~300 times the norm to move the outputs as much). Chosen on
    the testbed spectra (``C`` over 100k tokens): testbed-gpt2 layer 2 has 20 dead GELU units (per-unit mean square
    ≤ 2.1e-5 of the top eigenvalue, then a gap to 3e-4) and 1e-5 removes 19 of them, while no eigenvalue of
    testbed-llama's layers (continuous spectra from 1.1e-5 up) nor of gpt2 layer 0 is touched; 1e-4 would cut 64-72
    ordinary low-variance directions of llama layers 1-2. It is far above float64 rounding of ``C`` (~1e-16).

    The check costs one Cholesky factorisation of ``C − τI`` with ``τ = dead_rtol · ‖C‖_∞`` (``‖C‖_∞ ≥ λ_max``):
    when it succeeds every eigenvalue exceeds the threshold and no eigendecomposition is done. Otherwise ``C`` is
    decomposed with ``eigh``. Raises :class:`SingularSystemError` (naming ``what``) when ``C`` is zero or more
    than :data:`MAX_DEAD_FRACTION` of its directions are dead (statistics missing or from too few tokens).
    """
    if not dead_rtol >= 0:
        raise ValueError(f"dead_rtol must be ≥ 0, got {dead_rtol}")
    dev = C.device if device is None else torch.device(device)
    C64 = _f64(C, dev)
    C64 = 0.5 * (C64 + C64.T)
    bound = float(C64.abs().sum(1).max()) if C64.numel() else 0.0
    if not bound > 0:
        raise SingularSystemError(f"{what} is zero; the statistics are missing or computed on too few tokens")
    eye = torch.eye(C64.shape[0], dtype=C64.dtype, device=dev)
    _, info = torch.linalg.cholesky_ex(C64 - dead_rtol * bound * eye)
    if int(info) == 0:
        return None
    evals, evecs = torch.linalg.eigh(C64)
    live = evals > dead_rtol * evals.max()
    n_dead = int((~live).sum())
    if n_dead == 0:
        return None
    if n_dead > MAX_DEAD_FRACTION * C64.shape[0]:
        raise SingularSystemError(
            f"{what} is singular ({n_dead} of {C64.shape[0]} eigenvalues ≤ {dead_rtol:g}·max); usually the "
            "statistics are missing or computed on too few tokens"
        )
    return evals[live], evecs[:, live].contiguous()


def rome_rank_one(
    C: torch.Tensor | None,
    k_star: torch.Tensor,
    k_e: torch.Tensor,
    residual: torch.Tensor,
    *,
    ridge: float = 0.0,
    dead_rtol: float = DEAD_RTOL,
    what: str = "ROME",
) -> tuple[torch.Tensor, torch.Tensor]:
    """ROME's rank-one update (Meng et al. 2022, eq. 2 in its code form).

    ``u = C⁻¹k* / ‖C⁻¹k*‖`` (``C = I`` when ``C is None``; ``C + ridge·I`` with a ridge), ``r = residual / (uᵀ
    k_e)``; the update is ``Δ = r uᵀ`` so that ``(W + Δ) k_e = W k_e + residual``. Dead directions of ``C``
    (:func:`live_spectrum`) are left out of ``C⁻¹`` (pseudo-inverse ``U_l (S_l + ridge)⁻¹ U_lᵀ``), so ``Δ u_dead
    = 0``. Returns ``(r [d], u [d_k])`` in float64 on ``k_star``'s device.
    """
    dev = k_star.device
    k_star64, k_e64 = _f64(k_star, dev), _f64(k_e, dev)
    if C is None:
        u = k_star64.clone()
    else:
        spec = live_spectrum(C, dead_rtol, device=dev, what=f"{what} covariance")
        if spec is None:
            A = _f64(C, dev)
            if ridge:
                A = A + ridge * torch.eye(A.shape[0], dtype=A.dtype, device=dev)
            u = solve_spd(A, k_star64, what=f"{what} covariance solve")
        else:
            S, U = spec
            u = U @ ((U.T @ k_star64) / (S + ridge))
    norm = u.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise SingularSystemError(f"{what}: C⁻¹k* is zero or non-finite")
    u = u / norm
    denom = u @ k_e64
    if denom.abs() < 1e-12 * k_e64.norm().clamp_min(1e-30):
        raise SingularSystemError(f"{what}: uᵀk_e ≈ 0 ({float(denom):.3e}); the edit key is orthogonal to u")
    return _f64(residual, dev) / denom, u


def _ridge_adjoint(
    K64: torch.Tensor, C: torch.Tensor, lam: float, dead_rtol: float, what: str
) -> torch.Tensor:
    """``(λC + K Kᵀ)⁻¹ K`` ``[d_k, n]``, on the live eigenspace of ``C`` when it has dead directions."""
    dev = K64.device
    spec = live_spectrum(C, dead_rtol, device=dev, what=what)
    if spec is None:
        return solve_spd(lam * _f64(C, dev) + K64 @ K64.T, K64, what=what)
    S, U = spec
    UK = U.T @ K64  # [r, n]
    return U @ solve_spd(lam * torch.diag(S) + UK @ UK.T, UK, what=what)


def ridge_update(
    K: torch.Tensor,
    R: torch.Tensor,
    C: torch.Tensor,
    lam: float,
    *,
    dead_rtol: float = DEAD_RTOL,
    what: str = "ridge",
) -> torch.Tensor:
    """MEMIT's solve ``Δ = R Kᵀ (λC + K Kᵀ)⁻¹`` (Meng et al. 2023, eq. 14), the minimiser of
    ``‖ΔK − R‖² + λ tr(Δ C Δᵀ)``. Returns ``Δ [d, d_k]`` in float64 on ``K``'s device.

    When ``C`` has dead directions (:func:`live_spectrum`) it is the minimiser over ``Δ = Δ' U_lᵀ``:
    ``Δ = R (U_lᵀK)ᵀ (λS_l + U_lᵀK KᵀU_l)⁻¹ U_lᵀ`` and ``Δ u_dead = 0``.
    """
    K64 = K.double()
    adj = _ridge_adjoint(K64, C, lam, dead_rtol, what)
    return _f64(R, K64.device) @ adj.T


def ridge_update_factors(
    K: torch.Tensor,
    R: torch.Tensor,
    C: torch.Tensor,
    lam: float,
    *,
    dead_rtol: float = DEAD_RTOL,
    what: str = "ridge",
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ridge_update` as rank-``n`` factors: ``Δ = left @ right`` with ``left = R`` ``[d, n]`` and
    ``right = ((λC + K Kᵀ)⁻¹ K)ᵀ`` ``[n, d_k]`` (the reference's ``(resid, adj_k)`` pair, Meng et al. 2023), on
    ``C``'s live eigenspace when it has dead directions (``right u_dead = 0``).

    Used by MEMIT and PMET (Li et al., AAAI 2024), which differ only in how the caller spreads ``R`` over layers.
    Raises :class:`SingularSystemError` (naming ``what``) when ``λC + K Kᵀ`` is singular.
    """
    K64 = K.double()
    adj = _ridge_adjoint(K64, C, lam, dead_rtol, what)  # [d_k, n]
    return _f64(R, K64.device), adj.T


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
    dead_rtol: float = DEAD_RTOL,
    what: str = "EMMET solve",
) -> tuple[torch.Tensor, torch.Tensor]:
    """EMMET's equality-constrained update (Gupta, Sajnani, Anumanchipalli, "A Unified Framework for Model
    Editing", 2024) as rank-``n`` factors, in float64 on ``K``'s device.

    Minimises ``tr(Δ C̃ Δᵀ)`` subject to ``Δ K = R`` with ``C̃ = λC + μI``; with the ridge ``λ_E`` on the
    constraint Gram matrix, ``D = Kᵀ C̃⁻¹ K + λ_E I`` and ``Δ = R D⁻¹ Kᵀ C̃⁻¹``, i.e. ``left = R D⁻¹`` ``[d, n]`` and
    ``right = (C̃⁻¹ K)ᵀ`` ``[n, d_k]``. With ``ridge = 0`` the constraint holds exactly: ``Δ K = R`` (needs
    ``n ≤ d_k`` and independent keys, else :class:`SingularSystemError`).

    When ``C`` has dead directions (:func:`live_spectrum`; judged on ``C``, whatever ``μ``) the minimisation is over
    ``Δ = Δ' U_lᵀ`` and ``C̃⁻¹`` becomes ``U_l (λS_l + μ)⁻¹ U_lᵀ``: ``Δ u_dead = 0``, and with ``ridge = 0`` still
    ``Δ K = R`` as long as the keys' live parts ``U_lᵀK`` are independent.
    """
    K64 = K.double()
    dev = K64.device
    spec = live_spectrum(C, dead_rtol, device=dev, what=f"{what} (preservation matrix λC + μI)")
    if spec is None:
        Ct = lam * _f64(C, dev)
        if mu:
            Ct = Ct + mu * torch.eye(Ct.shape[0], dtype=Ct.dtype, device=dev)
        Y = solve_spd(Ct, K64, what=f"{what} (preservation matrix λC + μI)")  # C̃⁻¹K  [d_k, n]
    else:
        S, U = spec
        Y = U @ ((U.T @ K64) / (lam * S + mu)[:, None])
    D = K64.T @ Y
    D = 0.5 * (D + D.T) + ridge * torch.eye(D.shape[0], dtype=D.dtype, device=dev)
    left = solve_spd(D, _f64(R, dev).T, what=f"{what} (constraint Gram KᵀC̃⁻¹K)").T
    return left, Y.T
