"""WISE: side memories (copies of one FFN output projection) behind an activation-score router; the weights are
never changed.

Wang, Li, Yao, Zhang, Xi, Zhang, Chen, Chen, "WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of
Large Language Models", NeurIPS 2024. Knowledge shards are merged with TIES-Merging (Yadav et al., NeurIPS 2023).

For each request, one after another, *on the live memory* (the memory, its shards, merge and router are in
:mod:`kedit.memory.side`; ``compute`` plans on a copy of it and never changes the model):

* **where it goes**: the side memory of an earlier edit of the same subject (a re-edit is trained where the old
  value lives), else the newest memory while it holds fewer than
  ``edits_per_memory`` edits, else a new memory (the paper's WISE-Retrieve); inside the memory, shard
  ``(edits in it) mod n_shards``, whose random mask of ratio ``mask_ratio`` is seeded by ``seed``, the memory and
  the shard;
* **what is trained**: the edit's residual ``r`` on that mask, with Adam (``lr``, at most ``steps``), *through the
  TIES merge*: the side memory in the loss is exactly ``ΔW_m = TIES(τ_1 … τ_s + r … τ_S)``, applied on every
  position (the merge's selections are piecewise constant; its gradient is taken straight through, ``∂ΔW/∂r =
  1 / (rows that can hold the entry)``);
* **the loss** (the paper's, plus memory-local replay): the teacher-forced target NLL, plus ``replay_weight`` times
  the NLL of up to ``replay`` earlier edits of the same memory (so a later edit does not overwrite them; an
  earlier edit of the same prompt is superseded: only a prompt's newest edit is replayed), plus the routing margins
  ``L_a = mean max(0, Δ_act(x_irr) − α) + max(0, β − Δ_act(x_e)) + mean max(0, γ − (Δ_act(x_e) − Δ_act(x_irr)))
  + mean max(0, β − Δ_act(x_old)) + Σ_{x ∈ {p, p ⊕ t}} max(0, max_{m' ≠ m} Δ_act_m'(x) + γ − Δ_act(x))`` (the last:
  retrieval picks the highest-scoring memory, so the edit's must outscore the others on its own prompt) with ``Δ_act(x) = mean_t ‖a_t ΔW_mᵀ‖`` (``a_t`` the projection's input),
  ``x_e`` the edit's prompt (and prompt ⊕ target; the smaller score counts), ``x_old`` the replayed edits and
  ``x_irr`` = ``n_irrelevant`` texts of the editing corpus (``EditContext.texts_for``) and the prompts of up to
  ``n_cross`` edits of *other* memories (so each memory answers for its own subjects);
* training stops once every NLL is below ``early_stop_loss`` and every margin holds.

The result is an :class:`~kedit.deltas.EditDelta` of :class:`~kedit.deltas.MemoryEntryUpdate` entries, one per
request (key: the edit's activations, value: its residual), each with a fresh edit id; applying it adds the
residuals to the model's side memory (re-merged there, the memory's threshold follows), reverting removes them.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from kedit.arch import get_adapter, math_weight
from kedit.core.batching import device_of
from kedit.core.context import EditContext
from kedit.core.keys import encode_with_subject, target_ids
from kedit.deltas import EditDelta, MemoryEntryUpdate
from kedit.deltas.ledger import compute_dtype
from kedit.memory import get_memory, memory_layer
from kedit.memory.codebook import Record
from kedit.memory.side import POOLS, MemoryState, SideMemory, activation_score, ties_dense
from kedit.methods.ft.objective import keep_grad_flags
from kedit.methods.presets import preset_for
from kedit.methods.registry import register_method
from kedit.requests import EditRequest

__all__ = ["WISEConfig", "compute_wise", "wise_layer"]

log = logging.getLogger(__name__)

_PAPER = ("Wang et al., WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of Large Language Models, "
          "NeurIPS 2024")


@dataclass
class WISEConfig:
    """WISE hyper-parameters (the reference's names in parentheses).

    Attributes:
        layer: the layer whose ``mlp_out`` projection gets the side memories; ``None``: ``round(layer_fraction ·
            (L − 1))`` (``inner_params``).
        layer_fraction: where ``layer=None`` puts the side memories, as a fraction of the depth.
        mask_ratio: fraction ρ of the projection's entries a shard may change (``mask_ratio``).
        lr: Adam learning rate of the residual's entries (``edit_lr``).
        steps: at most this many Adam steps per edit (``n_iter``).
        alpha, beta, gamma: the routing margins α (irrelevant scores below), β (edit score above), γ (their gap).
        act_ratio: a memory's threshold is ``act_ratio ·`` the smallest score of its edits (``act_ratio``).
        density: TIES trim density (fraction of each shard's entries kept when the shards are merged).
        edits_per_memory: a new subject's edit opens a new side memory once the newest holds this many edits
            (``save_freq``); edits of a subject already in a memory always join it. Default 1: one memory per subject (measured
            on the lifelong testbed stream: 5 and 50 let the edits of one memory overwrite each other).
        n_shards: knowledge shards (random masks) per side memory, merged with TIES (``merge_freq`` analogue).
        replay: earlier edits of the same memory whose NLL is kept in the loss (0: none, the paper's setting).
        replay_weight: weight of their NLL.
        n_cross: prompts of edits in other memories used as irrelevant inputs of the margins.
        n_cross_similar: of those, this many are the *hardest* ones instead of random draws: the other memories'
            prompts whose mean activation at the layer is closest (cosine) to this edit's prompt's (a later memory
            of the same template is what takes an earlier edit's prompt over); the other ``n_cross −
            n_cross_similar`` stay random. 0: all random.
        n_prefixes: random-prefix contexts per edit (the paper's augmented contexts): the target NLL is also taken
            after ``prefix ⊕ prompt`` for this many short texts of the editing corpus (0: the prompt alone; measured
            in docs/methods/wise.md: with 4, more paraphrases hit on a stream of few subjects, not on the lifelong
            stream of one fact per subject, at twice the time per edit).
        prefix_words: each prefix is the first this many words of a corpus text.
        subject_loss: weight of a second target NLL in which the memory acts *only* on the positions up to the
            subject's last token (of the prompt and of each prefixed prompt), so the residual must change what the
            later layers read from the subject, as ROME's edit at the subject's last token does (not in the
            paper; 0: off). Paraphrases share the subject, not the prompt's last token.
        n_irrelevant: irrelevant texts per edit for the margins (drawn from the editing corpus).
        irrelevant_tokens: each irrelevant text is cut to this many tokens.
        early_stop_loss: stop once every NLL is below this and every margin holds.
        seed: seed of the random masks and of the irrelevant / replay draws (combined with the request's text).
        router: ``"bounded"`` (default): the router scores every memory with bfloat16 bounds first and exactly only
            the memories that can still be the highest (:meth:`kedit.memory.side.MemoryState.ratios`; the same
            decisions and ratios as ``"exact"``, which scores every memory exactly). Saved with each edit; a
            memory routes with the bounds only when all its edits say ``"bounded"`` (older saved memories: exact).
        router_pool: how a sequence's token scores ``‖a_t ΔW_mᵀ‖₂`` become its score ``Δ_act_m``: ``"mean"`` over
            the real tokens (the paper's; default) or ``"max"`` (not in the paper: a paraphrase shares the subject's
            tokens with the edit prompt, not its length or template, and a mean dilutes them). Used everywhere a
            score is taken (router, thresholds ε, margins); saved with each edit, and one layer's memories all use
            one pool (an edit with the other one is refused).
    """

    layer: int | None = None
    layer_fraction: float = 0.8
    mask_ratio: float = 0.2
    lr: float = 0.1
    steps: int = 70
    alpha: float = 5.0
    beta: float = 20.0
    gamma: float = 10.0
    act_ratio: float = 0.88
    density: float = 0.8
    edits_per_memory: int = 1
    n_shards: int = 2
    replay: int = 4
    replay_weight: float = 1.0
    n_cross: int = 64
    n_cross_similar: int = 0
    n_prefixes: int = 0
    prefix_words: int = 6
    subject_loss: float = 0.0
    n_irrelevant: int = 8
    irrelevant_tokens: int = 32
    early_stop_loss: float = 0.05
    seed: int = 0
    router: str = "bounded"
    router_pool: str = "mean"

    def __post_init__(self) -> None:
        if self.router not in ("bounded", "exact"):
            raise ValueError(f"wise: router must be 'bounded' or 'exact', got {self.router!r}")
        if self.router_pool not in POOLS:
            raise ValueError(f"wise: router_pool must be one of {', '.join(POOLS)}, got {self.router_pool!r}")
        if not 0.0 < self.mask_ratio <= 1.0:
            raise ValueError(f"wise: mask_ratio must be in (0, 1], got {self.mask_ratio}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"wise: density must be in (0, 1], got {self.density}")
        if self.steps < 1 or not self.lr > 0:
            raise ValueError("wise: steps must be ≥ 1 and lr > 0")
        if not (self.alpha >= 0 and self.beta > 0 and self.gamma >= 0):
            raise ValueError("wise: margins need alpha ≥ 0, beta > 0, gamma ≥ 0")
        if not 0.0 < self.act_ratio <= 1.0:
            raise ValueError(f"wise: act_ratio must be in (0, 1], got {self.act_ratio}")
        if self.n_irrelevant < 1 or self.irrelevant_tokens < 1:
            raise ValueError("wise: n_irrelevant and irrelevant_tokens must be ≥ 1")
        if self.edits_per_memory < 1 or self.n_shards < 1:
            raise ValueError("wise: edits_per_memory and n_shards must be ≥ 1")
        if self.replay < 0 or self.n_cross < 0 or self.replay_weight < 0:
            raise ValueError("wise: replay, replay_weight and n_cross must be ≥ 0")
        if not 0 <= self.n_cross_similar <= self.n_cross:
            raise ValueError(f"wise: n_cross_similar must be in [0, n_cross = {self.n_cross}], "
                             f"got {self.n_cross_similar}")
        if self.n_prefixes < 0 or self.prefix_words < 1:
            raise ValueError("wise: n_prefixes must be ≥ 0 and prefix_words ≥ 1")
        if not self.subject_loss >= 0.0:
            raise ValueError(f"wise: subject_loss must be ≥ 0, got {self.subject_loss}")
        if not 0.0 <= self.layer_fraction <= 1.0:
            raise ValueError(f"wise: layer_fraction must be in [0, 1], got {self.layer_fraction}")


def wise_layer(model: nn.Module, cfg: WISEConfig) -> int:
    return memory_layer(model, cfg.layer, cfg.layer_fraction)


@contextmanager
def _side(module: nn.Module, delta_fn=None, store: list | None = None, where: torch.Tensor | None = None):
    """While active: record the module's inputs (``store``) and/or add ``a ΔWᵀ`` to its output, everywhere or only
    where ``where`` (``[B, T]``, 0/1) is set."""

    def hook(mod, args, out):
        if store is not None:
            store.append(args[0].detach())
        if delta_fn is None:
            return None
        d = delta_fn()
        add = args[0].to(d.dtype) @ d.T
        if where is not None:
            add = add * where.to(add.dtype).unsqueeze(-1)
        return (out.to(d.dtype) + add).to(out.dtype)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _suspended(mem: SideMemory | None):
    """The live side memory is off while an edit is trained (the trained memory is applied by ``_side``)."""
    if mem is None:
        yield
        return
    was, mem.suspended = mem.suspended, True
    try:
        yield
    finally:
        mem.suspended = was


def _hash(*parts) -> int:
    h = hashlib.sha256("\x00".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:7], "big")


def _corpus(ctx: EditContext, model: nn.Module, label: str) -> list[str]:
    try:
        texts, _ = ctx.texts_for(model)
    except Exception as e:  # MissingCorpusError: say what WISE needs it for
        raise ValueError(f"{label}: WISE needs generic texts for its routing margins (x_irr); pass "
                         "EditContext(corpus=texts)") from e
    texts = [t for t in (texts if isinstance(texts, list) else list(texts)) if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError(f"{label}: the editing corpus has no texts for WISE's routing margins")
    return texts


def _prefixes(texts: list[str], cfg: WISEConfig, seed: int) -> list[str]:
    """``n_prefixes`` random short contexts (the first ``prefix_words`` words of corpus texts), each ending in a
    sentence break, put before the edit prompt in the target NLL (the paper's random-prefix augmentation)."""
    if not cfg.n_prefixes:
        return []
    g = torch.Generator().manual_seed(seed ^ 0x5EED)
    out = []
    for i in torch.randperm(len(texts), generator=g).tolist():
        words = texts[i].split()[: cfg.prefix_words]
        if words:
            out.append(" ".join(words).rstrip(".,;:") + ".")
        if len(out) == cfg.n_prefixes:
            break
    return out


def _irrelevant(tok, texts: list[str], cfg: WISEConfig, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(texts), generator=g)[: cfg.n_irrelevant].tolist()
    out = []
    for i in pick:
        ids = tok(texts[i], add_special_tokens=True)["input_ids"][: cfg.irrelevant_tokens]
        if ids:
            out.append(ids)
    return out


def _acts(model: nn.Module, module: nn.Module, ids: list[int], cdt: torch.dtype) -> torch.Tensor:
    store: list = []
    with torch.no_grad(), _side(module, store=store):
        model(input_ids=torch.tensor([ids], device=device_of(model)))
    return store[0][0].to(cdt)


def _choose(state: MemoryState, req: EditRequest, cfg: WISEConfig) -> int:
    """The side memory an edit goes to (see the module docstring)."""
    for i in reversed(list(state.records)):
        if state.records[i].info.get("subject") == req.subject:
            return state.memory_of(i)
    if not state.members:
        return 0
    newest = max(state.members)
    return newest if len(state.members[newest]) < cfg.edits_per_memory else newest + 1


def _sample(ids: list[str], n: int, seed: int) -> list[str]:
    if len(ids) <= n:
        return list(ids)
    g = torch.Generator().manual_seed(seed)
    return [ids[j] for j in sorted(torch.randperm(len(ids), generator=g)[:n].tolist())]


def _cross(state: MemoryState, others: list[str], a_prompt: torch.Tensor, cfg: WISEConfig, seed: int) -> list[str]:
    """The ids of the other memories' edits whose prompts serve as irrelevant inputs: the ``n_cross_similar``
    closest by cosine of the mean prompt activation (ties by stream order), then random draws of the rest."""
    if len(others) <= cfg.n_cross:
        return list(others)
    hard: list[str] = []
    if cfg.n_cross_similar:
        q = a_prompt.double().mean(0)
        means = torch.stack([state.records[i].key.view(int(state.records[i].info["n_tokens"]), -1)
                             [: int(state.records[i].info["n_prompt"])].double().mean(0).to(q.device)
                             for i in others])
        cos = torch.nn.functional.cosine_similarity(means, q.unsqueeze(0), dim=1)
        order = torch.argsort(-cos, stable=True)[: cfg.n_cross_similar].tolist()
        hard = [others[j] for j in sorted(order)]
    chosen = set(hard)
    rest = [i for i in others if i not in chosen]
    return hard + _sample(rest, cfg.n_cross - len(hard), seed)


def _edit_one(model, tok, req: EditRequest, module: nn.Module, cfg: WISEConfig, ctx: EditContext,
              state: MemoryState, label: str):
    device = device_of(model)
    prompt = tok(req.text, add_special_tokens=True)["input_ids"]
    if not prompt:
        raise ValueError(f"{label}: prompt {req.text!r} tokenizes to nothing")
    tgt = target_ids(tok, req.target_new)
    seed = _hash(cfg.seed, req.text, req.target_new)
    cdt = compute_dtype(module.weight.dtype)
    d_out, d_in = math_weight(module).shape
    ids = prompt + tgt[:-1]
    a_full = _acts(model, module, ids, cdt)  # the layer's input does not depend on its own output: fixed
    a_prompt = a_full[: len(prompt)]

    m = _choose(state, req, cfg)
    members = state.members.get(m, [])
    s = len(members) % cfg.n_shards
    idx_cpu = state.mask(m, s, _hash(cfg.seed, "mask", m, s), cfg.mask_ratio)
    idx = idx_cpu.to(device)
    tau, sizes, density = state.shard_tau(m, s + 1)
    if tau is None or not members:
        tau, sizes, density = torch.zeros(s + 1, d_in * d_out, dtype=cdt, device=device), [d_in * d_out] * (s + 1), \
            cfg.density
    tau = tau.to(device=device, dtype=cdt)
    sizes = list(sizes)
    sizes[s] = int(idx.numel())
    row = torch.zeros(tau.shape[0], 1, dtype=cdt, device=device)
    row[s] = 1.0

    # replay: earlier edits of this memory (an earlier edit of the same prompt is superseded, not replayed)
    latest = {state.records[i].info.get("prompt"): i for i in members}  # a re-edited prompt: its newest edit only
    live = [i for p, i in latest.items() if p != req.text]
    old = [state.records[i] for i in _sample(sorted(live, key=members.index), cfg.replay, seed)]
    seqs = [(ids, len(prompt), tgt)]
    texts = _corpus(ctx, model, label)
    prefixes = _prefixes(texts, cfg, seed)
    for pre in prefixes:  # augmented contexts: the same target after a random prefix
        p_ids = tok(f"{pre} {req.text}", add_special_tokens=True)["input_ids"]
        seqs.append((p_ids + tgt[:-1], len(p_ids), tgt))
    n_main = len(seqs)
    subj_last: list[int] = []
    if cfg.subject_loss > 0:  # the subject's last token of the prompt and of each prefixed prompt
        s0, s1 = req.subject_span
        texts_s = [req.text] + [f"{pre} {req.text}" for pre in prefixes]
        spans = [(s0, s1)] + [(s0 + len(pre) + 1, s1 + len(pre) + 1) for pre in prefixes]
        subj_last = [e.subject_last for e in encode_with_subject(tok, texts_s, spans)]
    for r in old:
        toks, n_p = list(r.info["tokens"]), int(r.info["n_prompt"])
        seqs.append((toks[:-1], n_p, toks[n_p:]))
    width = max(len(q[0]) for q in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    x = torch.tensor([q[0] + [pad] * (width - len(q[0])) for q in seqs], device=device)
    att = torch.tensor([[1] * len(q[0]) + [0] * (width - len(q[0])) for q in seqs], device=device)
    rows_i = torch.cat([torch.full((len(q[2]),), j) for j, q in enumerate(seqs)]).to(device)
    pos_i = torch.cat([torch.arange(q[1] - 1, q[1] - 1 + len(q[2])) for q in seqs]).to(device)
    labels = torch.tensor([t for q in seqs for t in q[2]], device=device)
    if subj_last:
        where = (torch.arange(width).unsqueeze(0) <= torch.tensor(subj_last).unsqueeze(1)).to(device)
        main_rows = rows_i < n_main

    old_acts = [(r.key.view(int(r.info["n_tokens"]), d_in).to(device, cdt), int(r.info["n_prompt"])) for r in old]
    others = [i for i in state.records if state.memory_of(i) != m]
    cross = [state.records[i] for i in _cross(state, others, a_prompt, cfg, seed + 1)]
    irr = [_acts(model, module, t, cdt) for t in _irrelevant(tok, texts, cfg, seed)]
    irr += [r.key.view(int(r.info["n_tokens"]), d_in)[: int(r.info["n_prompt"])].to(device, cdt) for r in cross]
    vals = torch.zeros(idx.numel(), dtype=cdt, device=device, requires_grad=True)

    # the merge is piecewise constant in its selections (trim, sign election, which rows count): its exact value
    # goes into the loss, its gradient is the straight-through one, as if the residual's entries were always among
    # the agreeing values (1 / the number of rows that can hold the entry); without that, a residual starting at
    # zero would get no gradient wherever another shard already holds the entry
    others = torch.cat([tau[:s], tau[s + 1:]])
    share = 1.0 / ((others != 0).sum(0).to(cdt) + 1.0)

    def delta() -> torch.Tensor:
        r_flat = torch.zeros(d_in * d_out, dtype=cdt, device=device).index_put((idx,), vals)
        with torch.no_grad():
            exact = ties_dense(tau + row * r_flat, density, sizes)
        return (exact + (r_flat - r_flat.detach()) * share).view(d_out, d_in)

    def edit_score(d: torch.Tensor, a: torch.Tensor, n_p: int) -> torch.Tensor:
        return torch.minimum(activation_score(a[:n_p], d, pool=pool), activation_score(a, d, pool=pool))

    # retrieval picks the memory with the highest score: this edit's must beat every other memory's on its prompt
    # (and prompt ⊕ target) by γ (those memories are fixed while it is trained)
    pool = cfg.router_pool
    rival_p = state.raw_scores(a_prompt, exclude=m)
    rival_f = state.raw_scores(a_full, exclude=m)
    rival = (float(rival_p.max()), float(rival_f.max())) if rival_p.numel() else None

    def scores(d: torch.Tensor):
        s_e = edit_score(d, a_full, len(prompt))
        s_irr = torch.stack([activation_score(a, d, pool=pool) for a in irr])
        s_old = torch.stack([edit_score(d, a, n_p) for a, n_p in old_acts]) if old_acts else None
        return s_e, s_irr, s_old

    opt = torch.optim.Adam([vals], lr=cfg.lr)
    nll_v = margin_v = float("inf")
    steps = 0
    for steps in range(1, cfg.steps + 1):  # noqa: B007  (read after the loop)
        opt.zero_grad()
        d = delta()
        with _side(module, lambda d=d: d):
            logits = model(input_ids=x, attention_mask=att).logits[rows_i, pos_i].float()
        tok_nll = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        per_seq = torch.zeros(len(seqs), device=device).index_add(0, rows_i, tok_nll) / torch.bincount(
            rows_i, minlength=len(seqs)).to(tok_nll.dtype)
        nll = per_seq[:n_main].mean() + (cfg.replay_weight * per_seq[n_main:].mean() if len(seqs) > n_main
                                          else 0.0)
        if subj_last:  # the same targets with the memory on the subject positions only
            with _side(module, lambda d=d: d, where=where):
                lg = model(input_ids=x[:n_main], attention_mask=att[:n_main]).logits[rows_i[main_rows],
                                                                                     pos_i[main_rows]].float()
            s_nll = torch.nn.functional.cross_entropy(lg, labels[main_rows], reduction="none")
            s_seq = torch.zeros(n_main, device=device).index_add(0, rows_i[main_rows], s_nll) / torch.bincount(
                rows_i[main_rows], minlength=n_main).to(s_nll.dtype)
            nll = nll + cfg.subject_loss * s_seq.mean()
            per_seq = torch.cat([per_seq, s_seq.detach()])
        s_e, s_irr, s_old = scores(d)
        margin = (torch.relu(s_irr - cfg.alpha).mean() + torch.relu(cfg.beta - s_e)
                  + torch.relu(cfg.gamma - (s_e - s_irr)).mean())
        if s_old is not None:
            margin = margin + torch.relu(cfg.beta - s_old).mean()
        if rival is not None:
            margin = (margin + torch.relu(rival[0] + cfg.gamma - activation_score(a_prompt, d, pool=pool))
                      + torch.relu(rival[1] + cfg.gamma - activation_score(a_full, d, pool=pool)))
        nll_v, margin_v = float(per_seq.detach().max()), float(margin.detach())
        if nll_v < cfg.early_stop_loss and margin_v == 0.0:
            break
        (nll + margin.to(nll.dtype)).backward()
        opt.step()
    final = vals.detach().clone()
    if not torch.isfinite(final).all():
        raise ValueError(f"{label}: the WISE residual diverged (non-finite); lower lr")
    with torch.no_grad():
        vals.data.copy_(final)
        s_e, s_irr, _ = scores(delta())
    if not float(s_e) > 0:
        raise ValueError(f"{label}: the WISE residual does not move the edit's activations (score 0); raise lr or "
                         "steps")
    log.debug("%s: memory %d shard %d, %d step(s), nll %.4f, margins %.4f, score %.3f (irrelevant max %.3f)",
              label, m, s, steps, nll_v, margin_v, float(s_e), float(s_irr.max()))
    info = {"mask_seed": _hash(cfg.seed, "mask", m, s), "mask_ratio": float(cfg.mask_ratio),
            "n_tokens": int(a_full.shape[0]), "n_prompt": len(prompt), "act_ratio": float(cfg.act_ratio),
            "density": float(density), "memory": int(m), "shard": int(s), "tokens": [int(t) for t in prompt + tgt],
            "subject": req.subject, "prompt": req.text, "router": cfg.router, "pool": pool}
    if members:  # the shard's mask is the one its earlier records were trained on
        for i in members:
            ri = state.records[i].info
            if int(ri["shard"]) == s:
                info["mask_seed"], info["mask_ratio"] = int(ri["mask_seed"]), float(ri["mask_ratio"])
                break
    stats = {"loss": nll_v, "margin_loss": margin_v, "steps": steps, "score": float(s_e),
             "irrelevant_max": float(s_irr.max()), "memory": int(m), "shard": int(s), "replayed": len(old)}
    return a_full, final, info, stats


def compute_wise(
    model: nn.Module, tok, requests: Sequence[EditRequest], cfg: WISEConfig, ctx: EditContext | None = None
) -> EditDelta:
    """One residual per request, each trained on the live side memory plus the earlier requests of this call (see
    the module docstring); the model is left bit-identical."""
    from kedit.api import record_label

    ctx = ctx or EditContext()
    adapter = get_adapter(model)
    layer = wise_layer(model, cfg)
    path = adapter.path("mlp_out", layer)
    module = adapter.module(model, "mlp_out", layer)
    d_out, d_in = math_weight(module).shape
    live = get_memory(model).get(f"{path}#{SideMemory.kind}")
    live = live if isinstance(live, SideMemory) else None
    state = live.copy() if live is not None else MemoryState(path, int(d_in), int(d_out))
    if len(state) and state.pool != cfg.router_pool:  # refused before any training (MemoryState.add would, after)
        raise ValueError(f"wise: the live memory at {path!r} routes with router_pool={state.pool!r}; this edit asks "
                         f"for {cfg.router_pool!r} (one router scores every side memory of a layer)")
    updates = []
    stats = []
    with keep_grad_flags(model, freeze=True), _suspended(live):
        for i, req in enumerate(requests):
            label = record_label(i, req.case_id)
            acts, vals, info, st = _edit_one(model, tok, req, module, cfg, ctx, state, label)
            edit_id = uuid.uuid4().hex[:16]
            full = {"edit_id": edit_id, "module": path, "label": req.target_new.strip(), "epsilon": 0.0,
                    "method": "wise", **info}
            rec = Record(edit_id, acts.reshape(-1).detach(), vals, full["label"], 0.0, "wise", None, dict(full))
            state.add([rec])
            full["epsilon"] = float(state.eps[info["memory"]])
            updates.append(MemoryEntryUpdate(f"{path}#wise:{edit_id}", acts.reshape(-1).cpu(), vals.cpu(), full))
            stats.append({"edit_id": edit_id, **st})
    return EditDelta.for_model(model, updates, method="wise", config=asdict(cfg), requests=requests,
                               meta={"layer": layer, "module": path, "shard_training": stats})


def _presets(model: nn.Module) -> dict:
    return preset_for("wise", model)


register_method(
    "wise",
    config=WISEConfig,
    compute=compute_wise,
    paper=_PAPER,
    summary="side memories (copies of one FFN output projection) behind an activation-score router; residuals "
            "trained on the live memory under random shard masks, TIES-merged (weights untouched; edits removable "
            "by id)",
    presets=_presets,
    mergeable=False,
    rollback="by edit id, any order (side memory)",
    batched=False,
)
