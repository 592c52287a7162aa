"""Invariants of forgetting-aware fine-tuning's importances and penalty: SI's path integral is exact for SGD on a
quadratic (closed form), Ω is zero for frozen parameters, the penalty and its gradient vanish at the anchor, the
gradient is the analytic one, dynamic layer coefficients are a distribution, and a strong penalty pins high-Ω
weights while low-Ω weights move."""

from __future__ import annotations

import pytest
import torch

from kedit.finetune import Importance, ImportancePenalty, SIAccumulator, fisher_diagonal
from kedit.finetune.importance import LoraView, fisher_full_space, lora_deltas


def _sgd_on_quadratic(h, c, theta0, lr, steps, frozen=None):
    theta = torch.nn.Parameter(theta0.clone())
    params = [("theta", theta)]
    if frozen is not None:
        params.append(("frozen", frozen))
    si = SIAccumulator(params, xi=1e-3)
    opt = torch.optim.SGD([theta], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (h * (theta - c).square()).sum()).backward()
        si.before_step()
        opt.step()
        si.after_step()
    return si, theta


def test_si_path_integral_is_exact_on_a_quadratic():
    torch.manual_seed(0)
    h = torch.rand(50, dtype=torch.float64) * 2 + 0.1
    c = torch.randn(50, dtype=torch.float64)
    theta0 = torch.randn(50, dtype=torch.float64)
    lr, steps = 0.1, 40
    si, theta = _sgd_on_quadratic(h, c, theta0, lr, steps)
    # θ_t − c = q^t (θ_0 − c) with q = 1 − lr·h; ω = Σ_t lr·g_t² = lr h² e0² Σ_t q^{2t}
    q = 1 - lr * h
    e0 = theta0 - c
    omega = lr * h**2 * e0**2 * (1 - q ** (2 * steps)) / (1 - q**2)
    torch.testing.assert_close(si.omega["theta"].double(), omega, rtol=1e-5, atol=1e-7)
    imp = si.finish()
    moved = (q**steps * e0 - e0) ** 2
    torch.testing.assert_close(
        imp.weights["theta"].double(), (omega / (moved + 1e-3)).clamp(min=0), rtol=1e-5, atol=1e-7
    )
    assert torch.equal(imp.anchor["theta"], theta.detach())
    # SI's path integral is the loss decrease in the small-step limit; with a finite step it is within lr·h of it
    drop = 0.5 * h * e0**2 * (1 - q ** (2 * steps))
    assert torch.all((omega - drop).abs() <= lr * h * drop + 1e-12)


def test_frozen_parameters_get_zero_importance():
    frozen = torch.nn.Parameter(torch.randn(5, dtype=torch.float64), requires_grad=False)
    si, _ = _sgd_on_quadratic(
        torch.ones(3, dtype=torch.float64),
        torch.zeros(3, dtype=torch.float64),
        torch.ones(3, dtype=torch.float64),
        0.1,
        5,
        frozen=frozen,
    )
    imp = si.finish()
    assert torch.count_nonzero(imp.weights["frozen"]) == 0 and torch.count_nonzero(imp.weights["theta"]) == 3


def _importance(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = {f"l{i}.{k}": torch.rand(4, 3, generator=g, dtype=torch.float64) for i in range(3) for k in "ab"}
    a = {n: torch.randn(4, 3, generator=g, dtype=torch.float64) for n in w}
    return Importance(w, a, "si"), {n: n.split(".")[0] for n in w}


@pytest.mark.parametrize("mode", ["dynamic", "balanced", "static", "none"])
def test_penalty_is_zero_with_zero_gradient_at_the_anchor(mode):
    imp, layers = _importance()
    pen = ImportancePenalty(imp, layers, mode, weight=3.0)
    params = {n: t.clone().requires_grad_(True) for n, t in imp.anchor.items()}
    val = pen(params, ce=torch.tensor(2.0, dtype=torch.float64))
    assert float(val.detach()) == 0.0
    grads = torch.autograd.grad(val, list(params.values()), allow_unused=True)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("mode", ["dynamic", "balanced", "static", "none"])
def test_penalty_gradient_matches_the_analytic_one(mode):
    imp, layers = _importance()
    pen = ImportancePenalty(imp, layers, mode, weight=0.7)
    g = torch.Generator().manual_seed(1)
    params = {
        n: (t + 0.3 * torch.randn(t.shape, generator=g, dtype=t.dtype)).requires_grad_(True)
        for n, t in imp.anchor.items()
    }
    ce = torch.tensor(1.9, dtype=torch.float64)
    val = pen(params, ce)
    grads = dict(zip(params, torch.autograd.grad(val, list(params.values()))))
    alpha = pen.last_alpha
    assert all(a >= 0 for a in alpha.values())
    with torch.no_grad():
        ll = {k: float(v) for k, v in pen.layer_losses(params).items()}
    if mode in ("dynamic", "balanced"):
        assert sum(alpha.values()) == pytest.approx(1.0)
        assert alpha == pytest.approx({k: v / sum(ll.values()) for k, v in ll.items()})
        if mode == "balanced":
            lam = 0.7 * 1.9 / sum(alpha[k] * ll[k] for k in ll)
            assert float(val.detach()) == pytest.approx(
                0.7 * 1.9
            )  # the balance: penalty = weight × task loss
        else:
            lam = 0.7 * 3
    else:
        lam = 0.7
        if mode == "static":
            means = {
                k: float(torch.cat([imp.weights[n].flatten() for n in imp.weights if layers[n] == k]).mean())
                for k in ll
            }
            assert alpha == pytest.approx({k: m / (sum(means.values()) / 3) for k, m in means.items()})
        else:
            assert set(alpha.values()) == {1.0}
    for n, p in params.items():
        expected = 2 * lam * alpha[layers[n]] * imp.weights[n] * (p.detach() - imp.anchor[n])
        torch.testing.assert_close(grads[n], expected)
    # and the static/none penalties pass torch's finite-difference check
    if mode in ("static", "none"):
        names = list(params)

        def f(*xs):
            return pen(dict(zip(names, xs)))

        assert torch.autograd.gradcheck(f, tuple(params.values()))


def test_strong_penalty_pins_important_weights_and_frees_unimportant_ones():
    torch.manual_seed(0)
    anchor = torch.zeros(2, 20, dtype=torch.float64)
    w = torch.zeros(2, 20, dtype=torch.float64)
    w[0] = 1.0  # row 0 important, row 1 not
    imp = Importance({"p": w}, {"p": anchor}, "si")
    pen = ImportancePenalty(imp, {"p": 0}, "none", weight=1e4)
    theta = torch.nn.Parameter(anchor.clone())
    target = torch.ones_like(anchor)
    opt = torch.optim.SGD([theta], lr=1e-5)
    for _ in range(2000):
        opt.zero_grad()
        ((theta - target).square().sum() + pen({"p": theta})).backward()
        opt.step()
    assert float(theta.detach()[0].abs().max()) < 1e-3 < 0.03 < float(theta.detach()[1].min())


def test_fisher_is_the_mean_squared_per_sample_gradient():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 1, bias=False).double()
    xs = [
        {"x": torch.randn(1, 3, dtype=torch.float64), "y": torch.randn(1, 1, dtype=torch.float64)}
        for _ in range(6)
    ]

    def loss(m, b):
        return (m(b["x"]) - b["y"]).square().sum()

    imp = fisher_diagonal(lin, list(lin.named_parameters()), xs, loss)
    with torch.no_grad():
        per = torch.stack([(2 * (lin(b["x"]) - b["y"]) * b["x"]).squeeze(0) for b in xs])
    torch.testing.assert_close(imp.weights["weight"].squeeze(0).double(), per.square().mean(0))
    assert imp.kind == "ewc-ab" and imp.nbytes() == 3 * 4 + 3 * 8  # float32 Fisher + float64 anchor
    with pytest.raises(ValueError, match="at least one sample"):
        fisher_diagonal(lin, list(lin.named_parameters()), [], loss)


class _LowRank(torch.nn.Module):
    """``y = (W + s·B A) x`` with a frozen ``W`` stored ``[in, out]`` (as GPT-2's Conv1D) when ``transposed``."""

    def __init__(self, transposed: bool) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.transposed = transposed
        w = torch.randn(4, 3, generator=g, dtype=torch.float64)
        self.W = torch.nn.Parameter(w.t().contiguous() if transposed else w, requires_grad=False)
        self.A = torch.nn.Parameter(torch.randn(2, 3, generator=g, dtype=torch.float64))
        self.B = torch.nn.Parameter(torch.randn(4, 2, generator=g, dtype=torch.float64))

    def weight(self) -> torch.Tensor:
        w = self.W.t() if self.transposed else self.W
        return w + 0.5 * self.B @ self.A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight().t()


@pytest.mark.parametrize("transposed", [False, True])
def test_full_space_fisher_is_the_mean_squared_gradient_of_the_whole_weight(transposed):
    """EWC-LoRA: F_W = mean (∂ℓ/∂W)² over [out, in] (closed form 2 (y − t) xᵀ), the base weight's grad flag is
    restored, and the penalty on ΔW = s·B A vanishes with its gradient at the anchor and equals Σ F (ΔW − ΔW*)²."""
    torch.manual_seed(0)
    m = _LowRank(transposed)
    xs = [
        {"x": torch.randn(1, 3, dtype=torch.float64), "y": torch.randn(1, 4, dtype=torch.float64)}
        for _ in range(5)
    ]

    def loss(mod, b):
        return (mod(b["x"]) - b["y"]).square().sum()

    params = {"A": m.A, "B": m.B}
    views = {"lin": LoraView("A", "B", 0.5, transposed)}
    imp = fisher_full_space(m, {"lin": m.W}, views, params, xs, loss)
    with torch.no_grad():
        per = torch.stack([2 * (m(b["x"]) - b["y"]).t() @ b["x"] for b in xs])  # [n, out, in]
    torch.testing.assert_close(imp.weights["lin"].double(), per.square().mean(0), rtol=1e-6, atol=1e-9)
    assert imp.weights["lin"].shape == (4, 3) and imp.kind == "ewc"
    assert not m.W.requires_grad and m.W.grad is None
    assert imp.nbytes() == 12 * 4 + (6 + 8) * 8  # full-size float32 Fisher + the float64 factors

    pen = ImportancePenalty(imp, {"lin": 0}, "none", 3.0, view=lambda ps: lora_deltas(views, ps))
    at = pen(params)
    at.backward()
    assert (
        float(at.detach()) == 0.0
        and float(m.A.grad.abs().max()) == 0.0
        and float(m.B.grad.abs().max()) == 0.0
    )
    with torch.no_grad():
        m.A.add_(0.1)
    m.A.grad = m.B.grad = None
    got = pen(params)
    got.backward()
    a_star, b_star = imp.anchor["A"], imp.anchor["B"]
    A = m.A.detach().clone().requires_grad_(True)
    want = 3.0 * (imp.weights["lin"] * (0.5 * m.B.detach() @ A - 0.5 * b_star @ a_star).square()).sum()
    want.backward()
    torch.testing.assert_close(got.detach(), want.detach())
    torch.testing.assert_close(m.A.grad, A.grad)
    with pytest.raises(ValueError, match="no base weight"):
        fisher_full_space(m, {}, views, params, xs, loss)
