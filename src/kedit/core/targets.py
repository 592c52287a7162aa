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

**Only the work the math needs** (exact, not an approximation):

* *The blocks below the first perturbed one run once per edit.* δ changes nothing below its site, so the hidden
  states entering the first block whose computation sees δ are cached (one no-grad pass per edit) and every
  step replays them: the lower blocks' ``forward`` is temporarily replaced by one that returns the cached
  states, while the model's own forward still builds the attention masks, position ids and rotary embeddings.
  A δ on a block's output, or on an MLP output that the block adds to its residual
  (:attr:`kedit.arch.ArchAdapter.mlp_post_norm` false), is added straight to the cached states, so ROME at
  layer ``l`` runs blocks ``l+1 ..`` only.
* *Logits are computed only where the loss reads them* (the target positions and the KL position): the output
  of the final norm is taken and the LM head is applied to those rows.
* *The KL prompt stops at the subject's last token* (its distribution is read there; later tokens cannot
  change it in a causal model).
* *Rows are chunked by a cost model* (:func:`_length_buckets`): one forward costs a fixed overhead plus its
  padded tokens, so a single request's few rows run as one padded chunk and large batches are cut by length.

Before the first step both shortcuts are checked against the plain full forward (a random δ on the plain and KL
rows); on an architecture where they disagree (a logit soft-cap after the LM head, a non-additive MLP output)
the optimiser falls back to the full forward with a warning. ``TargetConfig(reuse_lower_layers=False,
head_only_logits=False)`` forces the plain computation.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
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
    #: rows per forward/backward chunk (memory bound; results do not depend on it)
    max_rows: int = 256
    #: the fixed cost of one forward/backward in padded tokens, for the chunking cost model (results do not
    #: depend on it; see :func:`_length_buckets`)
    chunk_overhead_tokens: int = 256
    #: run the blocks below the first perturbed one once per edit instead of once per step (exact)
    reuse_lower_layers: bool = True
    #: apply the LM head only at the positions the loss reads (exact)
    head_only_logits: bool = True
    #: compute the positions before the subject's last token once per edit (key/value cache) and run only the
    #: later positions every step (exact)
    reuse_prefix: bool = True

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
    index: int = -1  # position in the row list (key of the cached lower-layer states)


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
        # the KL distribution is read at the subject's last token: later tokens cannot change it
        rows.append(_Row(i, encs[-1].ids[: encs[-1].subject_last + 1], encs[-1].subject_last, "kl"))
    for k, r in enumerate(rows):
        r.index = k
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
    sites = tuple(Site(s.slot, adapter.check_layer(model, s.layer)) for s in sites)
    n = len(requests)
    device = device_of(model)
    rows = _build_rows(tok, requests, templates, kl_prompt)
    paths = {s: adapter.path(s.slot, s.layer) for s in sites}
    pid = pad_id(tok)
    was_training = model.training
    model.eval()
    # δ is the only leaf that needs a gradient: frozen parameters keep autograd from recording (and saving
    # activations for) the weight-gradient side of every op; restored as they were afterwards
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in grad_flags:
        p.requires_grad_(False)
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
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                if which == "plain":
                    init = {s: gather_at(tr[p].output, idx).float() for s, p in paths.items()}
                else:
                    kl_init = F.log_softmax(gather_at(logits, idx).float(), dim=-1)
        init_norm = {s: init[s].norm(dim=-1).clamp_min(1e-12) for s in sites}
        by_slot = config.clamp_by_slot or {}
        clamp = {s: float(by_slot.get(s.slot, config.clamp_norm_factor)) for s in sites}
        n_rewrite = torch.zeros(n, device=device)
        for r in rows:
            if r.kind == "rewrite":
                n_rewrite[r.req] += 1
        plan = _make_plan(model, adapter, sites, paths, config, rows, pid, device)
        if plan.start or plan.head is not None or plan.cache_kw is not None:
            plan = _checked(model, plan, _Plan(hooked={p: s for s, p in paths.items()}), plain[:16] + kl_rows[:16], init,
                            kl_init, pid, device, n, n_rewrite)
        delta = {s: torch.zeros_like(init[s], requires_grad=True) for s in sites}
        opt = torch.optim.Adam(list(delta.values()), lr=config.lr)
        nu = torch.full((n,), config.nll_factor, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        steps = torch.zeros(n, dtype=torch.long)
        last_loss = torch.full((n,), float("nan"), device=device)
        last_nll = torch.full((n,), float("nan"), device=device)
        history: list[float] = []
        chunks: list[list[_Row]] = []
        chunks_for: torch.Tensor | None = None
        for it in range(config.steps):
            if chunks_for is None or not torch.equal(chunks_for, done):
                chunks = _length_buckets([r for r in rows if not done[r.req]], config.max_rows,
                                         config.chunk_overhead_tokens, by_prefix=plan.cache_kw is not None)
                chunks_for = done.clone()
                plan.layouts.clear()
            nll = torch.zeros(n, device=device)
            kl = torch.zeros(n, device=device)
            argmax_ok = torch.ones(n, dtype=torch.bool, device=device)
            grads = {s: torch.zeros_like(delta[s]) for s in sites}
            for chunk in chunks:
                nll_c, kl_c, ok_c = _chunk_losses(model, chunk, delta, plan, kl_init, pid, device, n, n_rewrite)
                nll = nll + nll_c.detach()
                kl = kl + kl_c.detach()
                argmax_ok &= ok_c
                chunk_loss = (nu * nll_c).sum() + config.kl_factor * kl_c.sum()
                if it < config.steps - 1 and chunk_loss.requires_grad:
                    g = torch.autograd.grad(chunk_loss, [delta[s] for s in sites], allow_unused=True)
                    for s, gs in zip(sites, g):
                        if gs is not None:
                            grads[s] += gs
            wd = sum(delta[s].detach().norm(dim=-1) / init_norm[s] ** 2 for s in sites)
            if config.adaptive_nll:
                nu = torch.where(argmax_ok, 0.1 * config.nll_factor, config.nll_factor)
            loss = nu * nll + config.kl_factor * kl + config.weight_decay * wd
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
            # weight-decay gradient in closed form: ∂/∂δ (λ‖δ‖/‖v₀‖²) = λ δ / (‖δ‖ ‖v₀‖²), 0 at δ = 0 (the
            # subgradient autograd's norm backward also takes), for the rows still optimised
            frozen = done.clone()
            keep = {s: delta[s].detach()[frozen].clone() for s in sites}
            for s in sites:
                d_s = delta[s].detach()
                nrm = d_s.norm(dim=-1, keepdim=True)
                coef = config.weight_decay * (~frozen).to(d_s.dtype).unsqueeze(-1) / init_norm[s].unsqueeze(-1) ** 2
                gw = torch.where(nrm > 0, d_s / nrm.clamp_min(1e-30), torch.zeros_like(d_s)) * coef
                g = grads[s] + gw
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
        for p, flag in grad_flags:
            p.requires_grad_(flag)
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


def _length_buckets(
    rows: list[_Row], max_rows: int, overhead_tokens: float = 256.0, *, by_prefix: bool = False
) -> list[list[_Row]]:
    """``rows`` cut into forward chunks that minimise a cost model of the forward/backward passes.

    A chunk of ``k`` rows padded to ``w`` positions costs ``overhead_tokens + k·w`` (a fixed per-pass cost --
    kernel launches, mask building, Python -- plus every padded position, which costs as much as a real one on a
    compute-bound device). A row's size is its length, or with ``by_prefix`` (the positions before the subject's
    last token come from a cache) its length from the subject's last token on. Rows are sorted by size and the
    contiguous partition of minimal total cost is found by dynamic programming over the distinct sizes; a
    segment of more than ``max_rows`` rows (the memory bound) is cut into ``max_rows``-row chunks and pays one
    overhead per chunk. So a single request's handful of rows runs as one padded chunk (several small passes
    cost more than the padding), while a large batch is cut into chunks of similar size. The optimisation
    result does not depend on the chunking (per-request losses are summed)."""
    if not rows:
        return []
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")

    def size(r: _Row) -> int:
        return len(r.ids) - r.subj if by_prefix else len(r.ids)

    order = sorted(rows, key=size)
    sizes = sorted({size(r) for r in order})
    count = dict.fromkeys(sizes, 0)
    for r in order:
        count[size(r)] += 1
    cum = [0]
    for w in sizes:
        cum.append(cum[-1] + count[w])
    g = len(sizes)
    best = [0.0] + [float("inf")] * g
    cut = [0] * (g + 1)
    for j in range(1, g + 1):  # a segment covers the sizes [i, j), padded to sizes[j - 1]
        for i in range(j):
            k = cum[j] - cum[i]
            cost = best[i] + -(-k // max_rows) * overhead_tokens + k * sizes[j - 1]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds = []
    j = g
    while j > 0:
        bounds.append((cum[cut[j]], cum[j]))
        j = cut[j]
    chunks = []
    for a, b in reversed(bounds):
        chunks.extend(order[c : min(c + max_rows, b)] for c in range(a, b, max_rows))
    return chunks


_MISSING = object()
_NORM = "<final norm>"  # trace name of the final norm (never a module path)


@dataclass
class _Plan:
    """How one step's forward is run (see the module docstring)."""

    hooked: dict[str, Site]  #: module path -> site whose δ a hook adds to that module's output
    start: int = 0  #: blocks ``[0, start)`` are replayed from ``cache`` instead of run
    entry: tuple[Site, ...] = ()  #: sites whose δ is added to the replayed states (block ``start - 1``'s output)
    blocks: nn.ModuleList | None = None
    out_len: int = 0  #: 0: a block returns a tensor; k: a k-tuple ``(hidden, None, ...)``
    cache: dict[int, torch.Tensor] = field(default_factory=dict)  #: row index -> states entering block ``start``
    norm: nn.Module | None = None  #: final norm, whose output the LM head is applied to (head-only logits)
    head: nn.Module | None = None
    cache_kw: str | None = None  #: the forward's key/value-cache argument when the prefix is reused, else None
    #: chunk rows -> the chunk's step-independent tensors and prefix cache (rebuilt when the chunks change)
    layouts: dict[tuple[int, ...], _Layout] = field(default_factory=dict)


def _first_block(adapter: ArchAdapter, site: Site) -> int:
    """Index of the first block whose computation sees a δ at ``site``: the next block when δ lands additively
    on the block's output (a block output; an MLP output added to the residual without a post-norm)."""
    additive = site.slot == "block" or (site.slot == "mlp_out" and not adapter.mlp_post_norm)
    return site.layer + 1 if additive else site.layer


def _make_plan(
    model: nn.Module,
    adapter: ArchAdapter,
    sites: tuple[Site, ...],
    paths: dict[Site, str],
    config: TargetConfig,
    rows: list[_Row],
    pid: int,
    device: torch.device,
) -> _Plan:
    start = min(_first_block(adapter, s) for s in sites) if config.reuse_lower_layers else 0
    norm = adapter.module(model, "final_norm")
    plan = _Plan(
        hooked={paths[s]: s for s in sites if s.layer >= start},
        start=start,
        entry=tuple(s for s in sites if s.layer < start),
        norm=norm if config.head_only_logits else None,
        head=adapter.module(model, "unembed") if config.head_only_logits else None,
    )
    if config.reuse_prefix:
        params = inspect.signature(model.forward).parameters
        plan.cache_kw = next((k for k in ("cache", "past_key_values") if k in params), None)
    if start == 0:
        return plan
    blocks = model.get_submodule(adapter.path("layers"))
    plan.blocks = blocks
    entry_module = blocks[start] if start < len(blocks) else norm
    seen: dict[str, object] = {}
    handle = blocks[start - 1].register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))
    try:
        with torch.no_grad():
            for chunk in _length_buckets(rows, config.max_rows, config.chunk_overhead_tokens):
                ids, mask = pad_batch([r.ids for r in chunk], pid, device)
                with trace(model, {"entry": entry_module}, retain_input=True, retain_output=False, stop=True) as tr:
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
                states = tr["entry"].input
                for b, r in enumerate(chunk):
                    plan.cache[r.index] = states[b, : len(r.ids)].clone()
    finally:
        handle.remove()
    out = seen.get("out")
    if isinstance(out, torch.Tensor):
        plan.out_len = 0
    elif isinstance(out, tuple) and out and all(v is None for v in out[1:]):
        plan.out_len = len(out)
    else:
        log.warning("blocks return %s: the lower layers are recomputed every step", type(out).__name__)
        plan.start, plan.entry, plan.blocks, plan.cache = 0, (), None, {}
        plan.hooked = {p: s for s, p in paths.items()}
    return plan


def _checked(
    model: nn.Module,
    plan: _Plan,
    full: _Plan,
    rows: list[_Row],
    init: dict[Site, torch.Tensor],
    kl_init: torch.Tensor,
    pid: int,
    device: torch.device,
    n: int,
    n_rewrite: torch.Tensor,
) -> _Plan:
    """``plan`` if it reproduces the plain full forward on ``rows`` with a random δ, else ``full``."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    probe = {}
    for s, v0 in init.items():
        d = torch.randn(v0.shape, generator=gen).to(v0.device)
        probe[s] = d * (0.5 * v0.norm(dim=-1, keepdim=True) / d.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    with torch.no_grad():
        a = _chunk_losses(model, rows, probe, plan, kl_init, pid, device, n, n_rewrite)
        b = _chunk_losses(model, rows, probe, full, kl_init, pid, device, n, n_rewrite)
    tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 5e-2
    if all(torch.allclose(x, y, rtol=tol, atol=tol) for x, y in zip(a[:2], b[:2])):
        return plan
    log.warning(
        "the target optimiser's shortcuts (cached lower layers, head-only logits) disagree with the full forward "
        "on this model (max |Δ NLL| %.2e); falling back to the full forward every step",
        float((a[0] - b[0]).abs().max()),
    )
    return full


@contextlib.contextmanager
def _replayed(blocks: nn.ModuleList, start: int, states: torch.Tensor, out_len: int) -> Iterator[None]:
    """Blocks ``[0, start)`` return ``states`` (in the blocks' own output format) instead of computing."""
    out = states if out_len == 0 else (states, *([None] * (out_len - 1)))

    def forward(*args, **kwargs):
        return out

    saved = []
    try:
        for i in range(start):
            block = blocks[i]
            saved.append((block, block.__dict__.get("forward", _MISSING)))
            block.forward = forward
        yield
    finally:
        for block, prev in saved:
            if prev is _MISSING:
                del block.forward
            else:
                block.forward = prev


def _fresh_cache(prefix: object) -> object:
    """A cache holding ``prefix``'s keys and values, for one step's forward to extend (the prefix stays as it
    is). The cache layers' ``update`` concatenates into new tensors, so the new cache can share the prefix tensors:
    this costs a few small copies where ``copy.deepcopy`` walks the whole cache object every step."""
    from transformers import DynamicCache

    layers = getattr(prefix, "layers", None)
    if type(prefix) is DynamicCache and layers is not None:
        try:
            return DynamicCache(ddp_cache_data=[(layer.keys, layer.values) for layer in layers])
        except (AttributeError, TypeError):  # pragma: no cover - a transformers without these names
            pass
    return copy.deepcopy(prefix)


@dataclass
class _Layout:
    """The step-independent tensors of one chunk (built once per chunk, reused by every step)."""

    req: torch.Tensor
    run: dict[str, object]
    pre: int
    shift: list[int]
    subj: torch.Tensor
    rows_idx: torch.Tensor
    b_t: torch.Tensor
    t_t: torch.Tensor
    n_tgt: int
    kr: list[int]
    tgt_t: torch.Tensor | None = None
    owner_t: torch.Tensor | None = None
    w: torch.Tensor | None = None
    kl_owners: torch.Tensor | None = None


def _layout(
    model: nn.Module, chunk: list[_Row], plan: _Plan, pid: int, device: torch.device, n_rewrite: torch.Tensor
) -> _Layout:
    req = torch.tensor([r.req for r in chunk], device=device)
    # With a reused prefix the rows are aligned on the subject's last token (left padding, explicit position
    # ids): the `pre` columns before it see no δ and come from a key/value cache built once per chunk, and each
    # step runs only the columns from the subject's last token on. Token t of row b sits at run column
    # t + shift[b].
    pre = max(r.subj for r in chunk) if plan.cache_kw is not None else 0
    offs = [pre - r.subj for r in chunk] if plan.cache_kw is not None else [0] * len(chunk)
    width = max(o + len(r.ids) for o, r in zip(offs, chunk))
    ids = torch.full((len(chunk), width), pid, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    pos = torch.zeros((len(chunk), width), dtype=torch.long)
    for b, (o, r) in enumerate(zip(offs, chunk)):
        ids[b, o : o + len(r.ids)] = torch.tensor(r.ids, dtype=torch.long)
        mask[b, o : o + len(r.ids)] = 1
        pos[b, o : o + len(r.ids)] = torch.arange(len(r.ids))
    ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
    shift = [o - pre for o in offs]
    run: dict[str, object] = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    if plan.cache_kw is not None:
        run = {"input_ids": ids[:, pre:], "attention_mask": mask, "position_ids": pos[:, pre:], "use_cache": False}
    if pre > 0:
        from transformers import DynamicCache

        prefix_cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=ids[:, :pre], attention_mask=mask[:, :pre], position_ids=pos[:, :pre],
                  use_cache=True, **{plan.cache_kw: prefix_cache})
        run.update({"use_cache": True, plan.cache_kw: prefix_cache})
    subj = torch.tensor([r.subj + sh for r, sh in zip(chunk, shift)], device=device)
    # the positions the loss reads: every target token of the rewrite rows, the subject's last token of KL rows
    rw = [i for i, r in enumerate(chunk) if r.kind == "rewrite"]
    kr = [i for i, r in enumerate(chunk) if r.kind == "kl"]
    b_idx, t_idx, tgt, owner, tok_w = [], [], [], [], []
    for i in rw:
        r = chunk[i]
        for t, tid in enumerate(r.tgt):
            b_idx.append(i)
            t_idx.append(r.tgt_start + t + shift[i])
            tgt.append(tid)
            owner.append(r.req)
            tok_w.append(1.0 / len(r.tgt))
    n_tgt = len(b_idx)
    b_idx += kr
    t_idx += [chunk[i].subj + shift[i] for i in kr]
    lay = _Layout(
        req=req, run=run, pre=pre, shift=shift, subj=subj, rows_idx=torch.arange(len(chunk), device=device),
        b_t=torch.tensor(b_idx, device=device, dtype=torch.long),
        t_t=torch.tensor(t_idx, device=device, dtype=torch.long), n_tgt=n_tgt, kr=kr,
    )
    if n_tgt:
        lay.tgt_t = torch.tensor(tgt, device=device)
        lay.owner_t = torch.tensor(owner, device=device)
        lay.w = torch.tensor(tok_w, device=device) / n_rewrite[lay.owner_t]
    if kr:
        lay.kl_owners = req[torch.tensor(kr, device=device)]
    return lay


def _chunk_losses(
    model: nn.Module,
    chunk: list[_Row],
    delta: dict[Site, torch.Tensor],
    plan: _Plan,
    kl_init: torch.Tensor,
    pid: int,
    device: torch.device,
    n: int,
    n_rewrite: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-request NLL (mean over the request's rewrite rows) and KL summed over this chunk's rows."""
    key = tuple(r.index for r in chunk)
    lay = plan.layouts.get(key)
    if lay is None:
        lay = plan.layouts[key] = _layout(model, chunk, plan, pid, device, n_rewrite)
    req, shift, subj, rows_idx = lay.req, lay.shift, lay.subj, lay.rows_idx
    run = dict(lay.run)
    if lay.pre > 0:
        run[plan.cache_kw] = _fresh_cache(run[plan.cache_kw])

    def bump(out: torch.Tensor, site: Site) -> torch.Tensor:
        # δ lives where v_0 was read (the site's device, which a sharded model need not share with the inputs)
        d = delta[site][req.to(delta[site].device)].to(device=out.device, dtype=out.dtype)
        idx = (rows_idx.to(out.device), subj.to(out.device))
        return torch.zeros_like(out).index_put(idx, d, accumulate=True)

    def add_delta(name: str, out: torch.Tensor) -> torch.Tensor | None:
        site = plan.hooked.get(name)
        return None if site is None else out + bump(out, site)

    traced: dict[str, nn.Module] = {p: model.get_submodule(p) for p in plan.hooked}
    if plan.head is not None and plan.norm is not None:
        traced[_NORM] = plan.norm
    logits = None
    tr = None
    with contextlib.ExitStack() as stack:
        if plan.start and plan.blocks is not None:
            states = torch.nn.utils.rnn.pad_sequence(
                [plan.cache[r.index][-sh:] if sh else plan.cache[r.index] for r, sh in zip(chunk, shift)],
                batch_first=True,
            )
            for s in plan.entry:
                states = states + bump(states, s)
            stack.enter_context(_replayed(plan.blocks, plan.start, states, plan.out_len))
        if traced:
            tr = stack.enter_context(
                trace(model, traced, retain_output=plan.head is not None, edit_output=add_delta,
                      detach=False, stop=plan.head is not None)
            )
        logits = model(**run).logits
    b_t, t_t, n_tgt, kr = lay.b_t, lay.t_t, lay.n_tgt, lay.kr
    if logits is None:  # head-only: the forward stopped after the final norm
        assert tr is not None and plan.head is not None
        sel_all = plan.head(tr[_NORM].output[b_t, t_t]).float()
    else:
        sel_all = logits[b_t, t_t].float()
    nll = torch.zeros(n, device=device)
    kl = torch.zeros(n, device=device)
    ok = torch.ones(n, dtype=torch.bool, device=device)
    if n_tgt:
        sel = sel_all[:n_tgt]
        tgt_t, owner_t, w = lay.tgt_t, lay.owner_t, lay.w
        logp = F.log_softmax(sel, dim=-1).gather(1, tgt_t[:, None]).squeeze(1)
        nll = nll.index_add(0, owner_t, -logp * w)
        wrong = (sel.argmax(-1) != tgt_t).float()
        bad = torch.zeros(n, device=device).index_add(0, owner_t, wrong)
        ok = bad == 0
    if kr:
        cur = F.log_softmax(sel_all[n_tgt:], dim=-1)
        owners = lay.kl_owners
        init = kl_init[owners]
        kl_rows = (cur.exp() * (cur - init)).sum(-1)
        kl = kl.index_add(0, owners, kl_rows)
    return nll, kl, ok
