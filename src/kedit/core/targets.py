"""One target optimiser for ROME's v*, MEMIT/AlphaEdit/EMMET/BLUE's z and PMET's (a*, m*).

For each request a free vector δ is added, at the subject's last token of every prompt, to the output of one or
more *sites* (``Site("mlp_out", l)`` for ROME, ``Site("block", l)`` for MEMIT-style methods, ``Site("attn_out", l)``
plus ``Site("mlp_out", l)`` for PMET). δ minimises (ROME §3 / MEMIT eq. 16, Meng et al. 2022/2023)

    L_i(δ) = ν · (1/J) Σ_j −mean_t log P(o*_t | c_j ⊕ p(s), δ)
             + λ_KL · KL(P_δ(·|"s is a") ‖ P_0(·|"s is a"))
             + λ_wd · Σ_sites ‖δ‖ / ‖v_0‖²

with Adam, early stopping at L_i < ``early_stop_loss``, and projection onto ‖δ‖ ≤ clamp·‖v_0‖ after every step.

**Batched over requests.** All requests of a batch are optimised *together*: every row of the padded batch
carries its own request's δ, the total loss is Σ_i L_i (so ∂/∂δ_i only sees L_i) and Adam is elementwise, so the
result equals per-request optimisation -- while a converged request is frozen and its rows leave the batch.
Gradients are taken with ``torch.autograd.grad`` w.r.t. δ only: the model's parameters never get ``.grad``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kedit.arch import ArchAdapter
from kedit.core.batching import device_of, pad_batch, pad_id
from kedit.core.keys import encode_with_subject, gather_at, target_ids
from kedit.hooks import trace
from kedit.requests import EditRequest

__all__ = ["Site", "TargetConfig", "TargetResult", "optimize_targets", "prompt_text"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Site:
    """Where δ is added: the output of ``slot`` (``"mlp_out"``, ``"attn_out"`` or ``"block"``) at ``layer``."""

    slot: str
    layer: int


@dataclass
class TargetConfig:
    """Numbers of the target optimisation (names follow the reference hyper-parameter files)."""

    lr: float = 0.5
    steps: int = 20
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    #: per-slot overrides of ``clamp_norm_factor`` (e.g. ``{"attn_out": 0.5}`` for PMET's attention δ)
    clamp_by_slot: dict[str, float] | None = None
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    nll_factor: float = 1.0
    #: PMET's adaptive NLL weight: once the target is the argmax everywhere, ν ← 0.1·nll_factor and the
    #: request stops when KL ≤ ``adaptive_kl_stop``
    adaptive_nll: bool = False
    adaptive_kl_stop: float = 0.01
    #: rows per forward/backward chunk (memory bound; results do not depend on it); rows are also bucketed by
    #: length so that padding stays under 15 % of a chunk's tokens
    max_rows: int = 256

    def __post_init__(self) -> None:
        clamps = {"clamp_norm_factor": self.clamp_norm_factor}
        clamps.update({f"clamp_by_slot[{k!r}]": v for k, v in (self.clamp_by_slot or {}).items()})
        for what, value in clamps.items():
            if not value >= 0:  # also refuses NaN
                raise ValueError(f"{what} must be >= 0 (a bound on ‖δ‖ relative to ‖v_0‖), got {value}")


@dataclass
class TargetResult:
    sites: tuple[Site, ...]
    delta: dict[Site, torch.Tensor]  #: [n, d] fp32
    init: dict[Site, torch.Tensor]  #: v_0 at the plain prompt, [n, d] fp32
    loss: torch.Tensor  #: [n] last total loss per request
    nll: torch.Tensor  #: [n] last NLL per request
    steps: torch.Tensor  #: [n] gradient steps taken per request
    history: list[float] = field(default_factory=list)

    def target(self, site: Site) -> torch.Tensor:
        return self.init[site] + self.delta[site]


def prompt_text(template: str, request: EditRequest, subject: str | None = None) -> tuple[str, tuple[int, int]]:
    """Fill a context template (``"prefix. {}"``) with the request's prompt and subject.

    Returns the text and the subject's character span.
    """
    subject = request.subject if subject is None else subject
    full = template.replace("{}", request.prompt, 1)
    start = full.index("{}")
    return full.replace("{}", subject, 1), (start, start + len(subject))


@dataclass
class _Row:
    req: int
    ids: list[int]
    subj: int
    kind: str  # "rewrite" | "kl"
    tgt_start: int = 0  # position whose logits predict the first target token
    tgt: tuple[int, ...] = ()


def _build_rows(tok, requests: Sequence[EditRequest], templates: Sequence[str], kl_prompt: str) -> list[_Row]:
    rows: list[_Row] = []
    for i, req in enumerate(requests):
        tgt = target_ids(tok, req.target_new)
        texts, spans = zip(*(prompt_text(t, req) for t in templates))
        kl_full = kl_prompt.replace("{}", req.subject, 1)
        kl_span = (kl_prompt.index("{}"), kl_prompt.index("{}") + len(req.subject))
        encs = encode_with_subject(tok, [*texts, kl_full], [*spans, kl_span])
        for e in encs[:-1]:
            rows.append(_Row(i, e.ids + tgt[:-1], e.subject_last, "rewrite", len(e.ids) - 1, tuple(tgt)))
        rows.append(_Row(i, encs[-1].ids, encs[-1].subject_last, "kl"))
    return rows


def optimize_targets(
    model: nn.Module,
    tok,
    adapter: ArchAdapter,
    requests: Sequence[EditRequest],
    sites: Sequence[Site],
    config: TargetConfig,
    templates: Sequence[str],
    *,
    kl_prompt: str = "{} is a",
    progress: Callable[[int, int], None] | None = None,
) -> TargetResult:
    """Optimise one δ per (request, site), all requests batched. See the module docstring.

    ``templates[0]`` must be the plain ``"{}"``: v_0 is read there. The model is left bit-identical.
    """
    if not templates or templates[0] != "{}":
        raise ValueError('the first context template must be "{}" (v_0 is read on the plain prompt)')
    sites = tuple(sites)
    n = len(requests)
    device = device_of(model)
    rows = _build_rows(tok, requests, templates, kl_prompt)
    paths = {s: adapter.path(s.slot, s.layer) for s in sites}
    pid = pad_id(tok)
    was_training = model.training
    model.eval()
    try:
        # -- pass 0: v_0 at every site (plain prompt) and the initial KL distributions --------------------------
        plain = [next(r for r in rows if r.req == i and r.kind == "rewrite") for i in range(n)]
        kl_rows = [next(r for r in rows if r.req == i and r.kind == "kl") for i in range(n)]
        init: dict[Site, torch.Tensor] = {}
        kl_init = torch.empty(0)
        with torch.no_grad():
            for which, subset in (("plain", plain), ("kl", kl_rows)):
                ids, mask = pad_batch([r.ids for r in subset], pid, device)
                idx = torch.tensor([r.subj for r in subset], device=device)
                with trace(model, list(paths.values())) as tr:
                    logits = model(input_ids=ids, attention_mask=mask).logits
                if which == "plain":
                    init = {s: gather_at(tr[p].output, idx).float() for s, p in paths.items()}
                else:
                    kl_init = F.log_softmax(gather_at(logits, idx).float(), dim=-1)
        init_norm = {s: init[s].norm(dim=-1).clamp_min(1e-12) for s in sites}
        by_slot = config.clamp_by_slot or {}
        clamp = {s: float(by_slot.get(s.slot, config.clamp_norm_factor)) for s in sites}
        delta = {s: torch.zeros_like(init[s], requires_grad=True) for s in sites}
        opt = torch.optim.Adam(list(delta.values()), lr=config.lr)
        n_rewrite = torch.zeros(n, device=device)
        for r in rows:
            if r.kind == "rewrite":
                n_rewrite[r.req] += 1
        nu = torch.full((n,), config.nll_factor, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        steps = torch.zeros(n, dtype=torch.long)
        last_loss = torch.full((n,), float("nan"), device=device)
        last_nll = torch.full((n,), float("nan"), device=device)
        history: list[float] = []
        for it in range(config.steps):
            active_rows = [r for r in rows if not done[r.req]]
            nll = torch.zeros(n, device=device)
            kl = torch.zeros(n, device=device)
            argmax_ok = torch.ones(n, dtype=torch.bool, device=device)
            grads = {s: torch.zeros_like(delta[s]) for s in sites}
            for chunk in _length_buckets(active_rows, config.max_rows):
                nll_c, kl_c, ok_c = _chunk_losses(
                    model, chunk, delta, paths, kl_init, pid, device, n, n_rewrite
                )
                nll = nll + nll_c.detach()
                kl = kl + kl_c.detach()
                argmax_ok &= ok_c
                chunk_loss = (nu * nll_c).sum() + config.kl_factor * kl_c.sum()
                if it < config.steps - 1 and chunk_loss.requires_grad:
                    g = torch.autograd.grad(chunk_loss, [delta[s] for s in sites], allow_unused=True)
                    for s, gs in zip(sites, g):
                        if gs is not None:
                            grads[s] += gs
            wd = sum(delta[s].norm(dim=-1) / init_norm[s] ** 2 for s in sites)
            if config.adaptive_nll:
                nu = torch.where(argmax_ok, 0.1 * config.nll_factor, config.nll_factor)
            loss = nu * nll + config.kl_factor * kl + config.weight_decay * wd.detach()
            active = ~done
            last_loss = torch.where(active, loss, last_loss)
            last_nll = torch.where(active, nll, last_nll)
            history.append(float(loss[active].mean()) if active.any() else 0.0)
            newly_done = active & (loss < config.early_stop_loss)
            if config.adaptive_nll:
                newly_done |= active & argmax_ok & (kl <= config.adaptive_kl_stop)
            done |= newly_done
            if progress is not None:
                progress(it + 1, config.steps)
            if bool(done.all()) or it == config.steps - 1:
                break
            # weight-decay gradient (closed form is awkward at δ=0: let autograd do it)
            wd_loss = config.weight_decay * (wd * (~done).float()).sum()
            wd_grads = torch.autograd.grad(wd_loss, [delta[s] for s in sites], allow_unused=True)
            frozen = done.clone()
            keep = {s: delta[s].detach()[frozen].clone() for s in sites}
            for s, gw in zip(sites, wd_grads):
                g = grads[s] + (gw if gw is not None else 0.0)
                g[frozen] = 0.0
                delta[s].grad = g
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for s in sites:
                    delta[s][frozen] = keep[s]
                    max_norm = clamp[s] * init_norm[s]
                    norms = delta[s].norm(dim=-1)
                    scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
                    delta[s].mul_(scale.unsqueeze(-1))
            steps[~frozen.cpu()] += 1
    finally:
        model.train(was_training)
    return TargetResult(
        sites=sites,
        delta={s: d.detach() for s, d in delta.items()},
        init=init,
        loss=last_loss.detach(),
        nll=last_nll.detach(),
        steps=steps,
        history=history,
    )


def _length_buckets(rows: list[_Row], max_rows: int, max_padding: float = 0.15) -> list[list[_Row]]:
    """``rows`` cut into forward chunks of similar length: sorted by length, a chunk closes when it holds
    ``max_rows`` rows or when adding the next (longer) row would make padding exceed ``max_padding`` of its
    tokens. On a compute-bound device every padded token costs as much as a real one (one padded batch of mixed
    lengths made batched optimisation 0.7× the speed of one request at a time on CPU); the result does not
    depend on the chunking (per-request losses are summed)."""
    chunks: list[list[_Row]] = []
    cur: list[_Row] = []
    real = 0
    for r in sorted(rows, key=lambda r: len(r.ids)):
        n = len(r.ids)
        if cur and (len(cur) >= max_rows or (len(cur) + 1) * n > (1 + max_padding) * (real + n)):
            chunks.append(cur)
            cur, real = [], 0
        cur.append(r)
        real += n
    if cur:
        chunks.append(cur)
    return chunks


def _chunk_losses(
    model: nn.Module,
    chunk: list[_Row],
    delta: dict[Site, torch.Tensor],
    paths: dict[Site, str],
    kl_init: torch.Tensor,
    pid: int,
    device: torch.device,
    n: int,
    n_rewrite: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-request NLL (mean over the request's rewrite rows) and KL summed over this chunk's rows."""
    ids, mask = pad_batch([r.ids for r in chunk], pid, device)
    req = torch.tensor([r.req for r in chunk], device=device)
    subj = torch.tensor([r.subj for r in chunk], device=device)
    rows_idx = torch.arange(len(chunk), device=device)
    by_path = {p: s for s, p in paths.items()}

    def add_delta(name: str, out: torch.Tensor) -> torch.Tensor:
        d = delta[by_path[name]][req].to(out.dtype)
        bump = torch.zeros_like(out).index_put((rows_idx, subj), d, accumulate=True)
        return out + bump

    with trace(model, list(paths.values()), retain_output=False, edit_output=add_delta):
        logits = model(input_ids=ids, attention_mask=mask).logits
    nll = torch.zeros(n, device=device)
    kl = torch.zeros(n, device=device)
    ok = torch.ones(n, dtype=torch.bool, device=device)
    rw = [i for i, r in enumerate(chunk) if r.kind == "rewrite"]
    if rw:
        b_idx, t_idx, tgt, owner, tok_w = [], [], [], [], []
        for i in rw:
            r = chunk[i]
            for t, tid in enumerate(r.tgt):
                b_idx.append(i)
                t_idx.append(r.tgt_start + t)
                tgt.append(tid)
                owner.append(r.req)
                tok_w.append(1.0 / len(r.tgt))
        sel = logits[torch.tensor(b_idx, device=device), torch.tensor(t_idx, device=device)].float()
        tgt_t = torch.tensor(tgt, device=device)
        logp = F.log_softmax(sel, dim=-1).gather(1, tgt_t[:, None]).squeeze(1)
        owner_t = torch.tensor(owner, device=device)
        w = torch.tensor(tok_w, device=device) / n_rewrite[owner_t]
        nll = nll.index_add(0, owner_t, -logp * w)
        wrong = (sel.argmax(-1) != tgt_t).float()
        bad = torch.zeros(n, device=device).index_add(0, owner_t, wrong)
        ok = bad == 0
    kr = [i for i, r in enumerate(chunk) if r.kind == "kl"]
    if kr:
        kr_t = torch.tensor(kr, device=device)
        cur = F.log_softmax(logits[kr_t, subj[kr_t]].float(), dim=-1)
        owners = req[kr_t]
        init = kl_init[owners]
        kl_rows = (cur.exp() * (cur - init)).sum(-1)
        kl = kl.index_add(0, owners, kl_rows)
    return nll, kl, ok
