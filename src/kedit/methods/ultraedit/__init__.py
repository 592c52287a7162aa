"""UltraEdit: Training-, Subject- and Memory-Free Lifelong Editing in Large Language Models (Gu et al., arXiv
2505.14679; code XiaojieGu/UltraEdit).

No target optimisation and no subject location: one forward and backward pass of the edit loss (``−log p`` of
``target_new`` given the prompt, teacher forced) on the current model gives, at every scored position of every
request (the positions whose logits predict a target token), the input ``k`` of each edited MLP output projection
and the gradient ``g = ∂L/∂(output)`` there. Then, per edited layer:

1. **lifelong normalisation**: running per-feature mean and (unbiased) variance of ``z = [k, g]`` over every
   UltraEdit turn so far *and this one* (Chan et al.'s pairwise merge of ``(n, mean, M2)``); ``ẑ = (z − μ)/(σ + ε)``
   split into ``k̂, ĝ`` (with fewer than two rows seen so far -- one single-token edit as the first turn -- there is
   no spread to divide by and ``ẑ = z``);
2. **pseudo values** ``v = −lr · ‖k̂‖² · ĝ`` (a normalised gradient step, scaled by the key's normalised energy);
3. **closed-form ridge** on the raw keys: ``Δ = Vᵀ K (KᵀK + ridge·I)⁻¹`` (``K`` ``[N, d_k]``, ``V`` ``[N, d]``),
   a rank-≤N update stored as low-rank factors.

Every edited layer's update comes from the same pass (the reference caches all modules, then edits them).

**Layers** (the paper's choice mapped through :mod:`kedit.arch`): the reference edits the MLP output projections
of two layers just below the top for Mistral-7B (layers 29, 30 of 32) and GPT-J on FEVER (layers 25,
26 of 28); the default here is the same place on any depth: ``mlp_out`` of layers ``L−3`` and ``L−2``.

**State**: the running statistics are edit state. Each delta carries this turn's own ``(n, mean, M2)`` per layer in
:attr:`~kedit.deltas.EditDelta.extras` (``"ultraedit.stats.<layer>.{n,mean,m2}"``); the running statistics are
*derived* by merging those of the UltraEdit deltas applied to the model, in apply order
(:func:`running_stats`), so a revert rolls them back with the weights exactly, a saved delta brings its
statistics back, and a delta never applied changes nothing. The merge is memoised on ``ctx.state["ultraedit"]`` by
application ids (extended by one merge per new delta, rebuilt by the same fold after a revert).

Differences from the reference, on purpose: statistics are per layer (the reference shares one normaliser between
modules of the same shape), kept in float64, and taken at the positions whose logits are scored (the reference
masks the answer tokens' own positions).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from kedit.arch import get_adapter, is_transposed
from kedit.core.batching import check_conflicts, device_of
from kedit.core.context import EditContext
from kedit.core.solve import solve_spd
from kedit.deltas import EditDelta, LowRankUpdate, applied_deltas
from kedit.methods.ft.objective import build_loss_batches, request_losses
from kedit.methods.registry import register_method
from kedit.requests import EditRequest

__all__ = [
    "STATS_EXTRA",
    "RunningStats",
    "UltraEditConfig",
    "compute_ultraedit",
    "default_layers",
    "running_stats",
    "ultraedit_features",
]

log = logging.getLogger(__name__)

STATE_KEY = "ultraedit"
#: prefix of the delta extras holding a turn's statistics: ``f"{STATS_EXTRA}{layer}.n|mean|m2"``
STATS_EXTRA = "ultraedit.stats."


@dataclass
class UltraEditConfig:
    """UltraEdit hyper-parameters.

    Attributes:
        layers: edited layers (their ``mlp_out`` projection); ``None``: :func:`default_layers`.
        lr: the step of the pseudo values ``v = −lr ‖k̂‖² ĝ``. 1e-3, measured on testbed-gpt2 ``lifelong/v1``
            (k = 10, 100 edits: reliability / untouched locality / perplexity ratio 41 % / 80 % / 1.04 at 1e-3,
            46 % / 49 % / 1.18 at 3e-3; 1e-2 is 100 % reliable on the first 10 edits but already doubles the
            perplexity and keeps 24 % locality). See docs/methods/ultraedit.md.
        ridge: the ridge of the closed-form solve ``(KᵀK + ridge·I)`` (1 in the reference).
        eps: added to the running standard deviation before dividing.
        batch_size: requests per forward/backward pass (``None``: all at once).
    """

    layers: tuple[int, ...] | None = None
    lr: float = 1e-3
    ridge: float = 1.0
    eps: float = 1e-6
    batch_size: int | None = None


@dataclass
class RunningStats:
    """``(n, mean, M2)`` of a set of rows, fp64: ``var = M2 / (n − 1)`` (unbiased, as ``torch.var``)."""

    n: int
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def of(cls, z: torch.Tensor) -> RunningStats:
        z = z.double()
        mean = z.mean(0)
        return cls(int(z.shape[0]), mean, ((z - mean) ** 2).sum(0))

    def merge(self, other: RunningStats) -> RunningStats:
        """Chan, Golub and LeVeque's pairwise combination: the statistics of the union of both row sets."""
        n = self.n + other.n
        d = other.mean.to(self.mean.device) - self.mean
        mean = self.mean + d * (other.n / n)
        m2 = self.m2 + other.m2.to(self.m2.device) + d * d * (self.n * other.n / n)
        return RunningStats(n, mean, m2)

    @property
    def std(self) -> torch.Tensor:
        return (self.m2 / max(self.n - 1, 1)).sqrt()


def default_layers(n_layers: int) -> tuple[int, ...]:
    """The reference's two layers just below the top, ``(L−3, L−2)``, clipped for shallow models."""
    if n_layers < 1:
        raise ValueError(f"a model needs at least one layer, got {n_layers}")
    if n_layers < 3:
        return (n_layers - 1,)
    return (n_layers - 3, n_layers - 2)


def _state(ctx: EditContext) -> dict[str, Any]:
    return ctx.state.setdefault(STATE_KEY, {"running": {}})


def running_stats(
    model, ctx: EditContext | None, layers: Sequence[int]
) -> tuple[dict[int, RunningStats | None], int]:
    """The lifelong statistics per layer merged over the UltraEdit deltas applied to ``model`` (oldest first;
    ``None`` before any), and the number of those deltas. Memoised on ``ctx`` by application ids."""
    state = _state(ctx) if ctx is not None else {"running": {}}
    mk = ctx.model_key(model) if ctx is not None else None
    carrying = [
        (d.application_id, d.extras)
        for d in applied_deltas(model)
        if any(k.startswith(STATS_EXTRA) for k in d.extras)
    ]
    out: dict[int, RunningStats | None] = {}
    for layer in layers:
        pre = f"{STATS_EXTRA}{layer}."
        parts = [(tok, ex) for tok, ex in carrying if f"{pre}n" in ex]
        tokens = tuple(t for t, _ in parts)
        memo = state["running"].get((mk, layer))
        total: RunningStats | None = None
        start = 0
        if memo is not None and len(memo[0]) <= len(tokens) and tokens[: len(memo[0])] == memo[0]:
            start, total = len(memo[0]), memo[1]
        for _, ex in parts[start:]:
            s = RunningStats(int(ex[f"{pre}n"].item()), ex[f"{pre}mean"].double(), ex[f"{pre}m2"].double())
            total = s if total is None else total.merge(s)
        if parts:
            state["running"][(mk, layer)] = (tokens, total)
        else:
            state["running"].pop((mk, layer), None)
        out[layer] = total
    return out, len(carrying)


def ultraedit_features(
    model, tok, requests: Sequence[EditRequest], layers: Sequence[int], *, batch_size: int | None = None
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (K [N, d_k], G [N, d])}`` fp32: the input of each ``mlp_out`` and the gradient of the summed
    per-request edit loss w.r.t. its output, at every scored position (one forward + backward per batch; the
    weights are not touched and get no gradient)."""
    adapter = get_adapter(model)
    device = device_of(model)
    batches = build_loss_batches(tok, requests, "target_new", device, batch_size)
    modules = {l: adapter.module(model, "mlp_out", l) for l in layers}
    keys: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    grads: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for batch in batches:
        seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def hook(layer, seen=seen):
            def fn(module, inputs, output):
                out = output[0] if isinstance(output, tuple) else output
                probe = torch.zeros_like(out, requires_grad=True)
                seen[layer] = (inputs[0].detach(), probe)
                return out + probe if not isinstance(output, tuple) else (out + probe, *output[1:])

            return fn

        handles = [m.register_forward_hook(hook(l)) for l, m in modules.items()]
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            with torch.enable_grad():
                logits = model(input_ids=batch.ids, attention_mask=batch.mask).logits
                request_losses(logits, batch).sum().backward()
        finally:
            for h in handles:
                h.remove()
            for p, f in flags:
                p.requires_grad_(f)
        for l in layers:
            k, probe = seen[l]
            keys[l].append(k[batch.rows, batch.pos].float())
            grads[l].append(probe.grad[batch.rows, batch.pos].float())
    return {l: (torch.cat(keys[l]), torch.cat(grads[l])) for l in layers}


def compute_ultraedit(
    model, tok, requests: Sequence[EditRequest], config: UltraEditConfig, ctx: EditContext | None = None
) -> EditDelta:
    """The UltraEdit delta for ``requests`` on the current model with the lifelong statistics of the UltraEdit
    deltas applied to it; it carries this turn's statistics. The model and every state are left unchanged."""
    ctx = ctx or EditContext()
    if not requests:
        raise ValueError("UltraEdit: no requests")
    check_conflicts(requests, "UltraEdit")
    for name, v in (("lr", config.lr), ("ridge", config.ridge), ("eps", config.eps)):
        if not (v > 0 and v == v and v != float("inf")):
            raise ValueError(f"UltraEdit: {name} must be a finite number > 0, got {v}")
    adapter = get_adapter(model)
    n_layers = adapter.num_layers(model)
    layers = tuple(config.layers) if config.layers is not None else default_layers(n_layers)
    if not layers or any(not 0 <= l < n_layers for l in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"UltraEdit: layers must be distinct indices in 0..{n_layers - 1}, got {layers}")
    prev, n_previous = running_stats(model, ctx, layers)
    feats = ultraedit_features(model, tok, requests, layers, batch_size=config.batch_size)
    updates, extras, diag = [], {}, {}
    for layer in layers:
        K, G = feats[layer]
        d_k = K.shape[1]
        z = torch.cat([K, G], dim=1).double()
        turn = RunningStats.of(z)
        stats = turn if prev[layer] is None else prev[layer].merge(turn)
        # fewer than two rows so far: no spread to normalise by (z − μ would be 0), the features are used as they are
        zh = (z - stats.mean) / (stats.std + config.eps) if stats.n >= 2 else z
        kh, gh = zh[:, :d_k], zh[:, d_k:]
        V = -config.lr * (kh * kh).sum(-1, keepdim=True) * gh  # [N, d]
        K64 = K.double()
        A = K64.T @ K64 + config.ridge * torch.eye(d_k, dtype=torch.float64, device=K64.device)
        right = solve_spd(A, K64.T, what=f"UltraEdit layer {layer} (KᵀK + ridge·I)").T  # [N, d_k]
        left = V.T  # [d, N]
        if not (torch.isfinite(left).all() and torch.isfinite(right).all()):
            raise ValueError(f"UltraEdit layer {layer}: the update is not finite (refused; the model is unchanged)")
        name = adapter.weight_name("mlp_out", layer)
        param = model.get_parameter(name)
        dt = torch.float64 if param.dtype == torch.float64 else torch.float32
        updates.append(
            LowRankUpdate.from_math(model, name, left.to(param.device, dt), right.to(param.device, dt))
        )
        extras[f"{STATS_EXTRA}{layer}.n"] = torch.tensor([turn.n], dtype=torch.int64)
        extras[f"{STATS_EXTRA}{layer}.mean"] = turn.mean.cpu().contiguous()
        extras[f"{STATS_EXTRA}{layer}.m2"] = turn.m2.cpu().contiguous()
        diag[str(layer)] = {
            "positions": int(K.shape[0]),
            "update_norm": float((left @ right).norm()),
            "value_norm": float(V.norm(dim=-1).mean()),
            "transposed": bool(is_transposed(adapter.module(model, "mlp_out", layer))),
        }
    delta = EditDelta.for_model(
        model,
        updates,
        method="ultraedit",
        config={**asdict(config), "layers": list(layers)},
        requests=[r.to_dict() for r in requests],
        meta={"ultraedit": {"previous_turns": n_previous, "layers": diag}},
    )
    delta.extras.update(extras)
    return delta


register_method(
    "ultraedit",
    config=UltraEditConfig,
    compute=compute_ultraedit,
    paper="Gu et al., UltraEdit: Training-, Subject-, and Memory-Free Lifelong Editing in Large Language Models, "
    "arXiv 2505.14679",
    summary="one gradient pass, lifelong-normalised keys/gradients, closed-form ridge on two top MLP layers",
    rollback="exact (LIFO), running statistics included (derived from the applied deltas)",
)
