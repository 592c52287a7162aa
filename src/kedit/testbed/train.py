"""Deterministic CPU trainer for the tiny testbed models (GPT-2 and Llama).

The loop is deliberately simple: AdamW, linear warmup then cosine decay, batches of padded sequences. With
``TrainConfig.pack_len`` > 0 (the recipe) each epoch's shuffled sentences are packed, joined by one space, into
sequences ``<|endoftext|> s1 s2 … <|endoftext|>`` of at most ``pack_len`` tokens (``single_frac`` of them stay
alone), so that facts are learnt at arbitrary offsets after arbitrary context. In fact sentences (also inside packed
sequences) the prompt tokens are down-weighted in the loss (``prompt_loss_weight``) so that capacity goes to the
object, yet every token keeps a loss: the models remain real language models. Determinism: the data order comes
from ``random.Random(seed)``, the weights from ``torch.manual_seed`` in a forked RNG scope, and the number of torch
threads is fixed by the config.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

__all__ = [
    "DEFAULT_SPECS",
    "MICRO_SPECS",
    "ModelSpec",
    "TrainConfig",
    "build_model",
    "widened",
    "encode_examples",
    "plan_steps",
    "train_model",
]

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ModelSpec:
    """Shape of one testbed model."""

    arch: str  # "gpt2" | "llama"
    d_model: int = 160
    n_layers: int = 6
    n_heads: int = 4
    d_mlp: int = 640  # GPT-2: 4 * d_model; Llama: gated MLP width
    max_positions: int = 128  # = TrainConfig.pack_len of the recipe, so every position is trained


DEFAULT_SPECS: dict[str, ModelSpec] = {
    "gpt2": ModelSpec("gpt2", d_model=160, n_layers=6, n_heads=4, d_mlp=640),
    "llama": ModelSpec("llama", d_model=160, n_layers=6, n_heads=4, d_mlp=432),
}
MICRO_SPECS: dict[str, ModelSpec] = {
    "gpt2": ModelSpec("gpt2", d_model=64, n_layers=6, n_heads=4, d_mlp=256),
    "llama": ModelSpec("llama", d_model=64, n_layers=6, n_heads=4, d_mlp=176),
}


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup_frac: float = 0.04
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    prompt_loss_weight: float = 0.25  # weight of non-object tokens in fact sentences (objects weigh 1)
    filler_per_epoch: int = 600  # filler sentences mixed into each epoch (rotating through the filler)
    # Packing: sentences are concatenated (separated by one space) into sequences of at most ``pack_len`` tokens
    # (bos and eos included), so facts occur at arbitrary offsets after arbitrary context; ``single_frac`` of the
    # sentences stay alone (``bos sentence eos``). ``pack_len=0`` disables packing (one sentence per sequence).
    # ``batch_size`` counts sequences (packed or single).
    pack_len: int = 0
    single_frac: float = 0.2
    seed: int = 0
    num_threads: int = 1  # 1 is robust on shared CPUs (2 threads stall badly when cores are oversubscribed)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


def widened(spec: ModelSpec, width: int | None) -> ModelSpec:
    """``spec`` at residual width ``width`` (``d_model``; ``n_embd`` / ``hidden_size``), with the MLP width scaled in
    proportion (GPT-2 stays at 4x, Llama's gated width keeps its ratio, rounded to a whole number) and the same
    depth and number of heads. ``None`` or the spec's own width returns ``spec`` unchanged. For the width series
    of ``docs/lifelong.md``: the same world and recipe trained at another width."""
    if width is None or width == spec.d_model:
        return spec
    if isinstance(width, bool) or not isinstance(width, int) or width <= 0 or width % spec.n_heads:
        raise ValueError(f"width must be a positive multiple of the {spec.n_heads} heads, got {width!r}")
    if (width // spec.n_heads) % 2:
        raise ValueError(f"width {width} gives an odd head size {width // spec.n_heads} (rotary needs it even)")
    return replace(spec, d_model=width, d_mlp=round(spec.d_mlp * width / spec.d_model))


def build_model(spec: ModelSpec, vocab_size: int, bos_id: int, eos_id: int, pad_id: int, seed: int) -> Any:
    """A freshly initialised ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` (deterministic for ``seed``)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    common = {
        "vocab_size": vocab_size,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec.arch == "gpt2":
            cfg = GPT2Config(
                n_positions=spec.max_positions,
                n_embd=spec.d_model,
                n_layer=spec.n_layers,
                n_head=spec.n_heads,
                n_inner=spec.d_mlp,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                tie_word_embeddings=True,
                **common,
            )
            model = GPT2LMHeadModel(cfg)
        elif spec.arch == "llama":
            cfg = LlamaConfig(
                hidden_size=spec.d_model,
                intermediate_size=spec.d_mlp,
                num_hidden_layers=spec.n_layers,
                num_attention_heads=spec.n_heads,
                num_key_value_heads=spec.n_heads,
                max_position_embeddings=spec.max_positions,
                rms_norm_eps=1e-5,
                rope_theta=10000.0,
                tie_word_embeddings=True,
                attention_dropout=0.0,
                **common,
            )
            model = LlamaForCausalLM(cfg)
        else:
            raise ValueError(f"unknown testbed architecture {spec.arch!r}; expected 'gpt2' or 'llama'")
    return model


@dataclass
class Example:
    ids: list[int]
    weights: list[float]  # loss weight of predicting ids[i] (weights[0] unused)
    # the sentence tokenised after a preceding sentence (" " + sentence, no bos/eos) and its loss weights, for
    # packing; the body at the start of a sequence is ``ids[1:-1]`` / ``weights[1:-1]``
    cont: list[int] = field(default_factory=list)
    cont_weights: list[float] = field(default_factory=list)


def encode_examples(
    tokenizer: Any,
    facts: Sequence[tuple[str, str]],
    plain: Sequence[str],
    prompt_loss_weight: float,
) -> tuple[list[Example], list[Example]]:
    """Encode fact sentences given as ``(prompt, object)`` and plain sentences.

    A fact becomes ``bos prompt ␣object . eos`` with weight 1 on the object, the full stop and eos, and
    ``prompt_loss_weight`` on the prompt tokens. Plain sentences weigh 1 everywhere. Each example also carries
    ``cont``: the sentence tokenised after a preceding one (``" " + sentence``, the byte-level pre-tokeniser makes
    this the tokenisation of the joined text) with the same per-token weights, used when packing.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def _fact(prefix: str) -> list[tuple[list[int], list[float]]]:
        prompts = tokenizer([prefix + p for p, _ in facts], add_special_tokens=False)["input_ids"]
        fulls = tokenizer([f"{prefix}{p} {o}." for p, o in facts], add_special_tokens=False)["input_ids"]
        out = []
        for p_ids, f_ids in zip(prompts, fulls):
            if f_ids[: len(p_ids)] != p_ids:
                raise ValueError("prompt tokenisation is not a prefix of the sentence tokenisation")
            out.append((f_ids, [prompt_loss_weight] * len(p_ids) + [1.0] * (len(f_ids) - len(p_ids))))
        return out

    fact_ex = [
        Example([bos] + f + [eos], [0.0] + w + [1.0], c, cw) for (f, w), (c, cw) in zip(_fact(""), _fact(" "))
    ]
    plain_ex = []
    bodies = tokenizer(list(plain), add_special_tokens=False)["input_ids"]
    conts = tokenizer([" " + t for t in plain], add_special_tokens=False)["input_ids"]
    for ids, c in zip(bodies, conts):
        ids = [bos] + ids + [eos]
        plain_ex.append(Example(ids, [0.0] + [1.0] * (len(ids) - 1), c, [1.0] * len(c)))
    return fact_ex, plain_ex


def _pack(rng: random.Random, items: list[Example], cfg: TrainConfig) -> list[Example]:
    """Greedy packing of the (shuffled) ``items``: ``bos s1 ␣s2 ␣s3 … eos`` up to ``cfg.pack_len`` tokens."""
    if cfg.pack_len <= 0:
        return items
    out: list[Example] = []
    cur: Example | None = None
    for e in items:
        if rng.random() < cfg.single_frac or not e.cont:
            out.append(e)
            continue
        if cur is not None and len(cur.ids) + len(e.cont) + 1 <= cfg.pack_len:
            cur.ids += e.cont
            cur.weights += e.cont_weights
            continue
        if cur is not None:
            out.append(Example(cur.ids + [e.ids[-1]], cur.weights + [1.0]))
        cur = Example(e.ids[:-1], e.weights[:-1])  # open a new sequence (eos appended when it is closed)
    if cur is not None:
        out.append(Example(cur.ids + [items[0].ids[-1]], cur.weights + [1.0]))
    return out


def _collate(batch: Sequence[Example], pad_id: int) -> tuple[Any, Any, Any]:
    import torch

    from kedit.core.batching import pad_batch

    ids, mask = pad_batch([e.ids for e in batch], pad_id)
    w = torch.zeros(mask.shape, dtype=torch.float32)
    w[mask.bool()] = torch.tensor([x for e in batch for x in e.weights], dtype=torch.float32)  # row-major = right pad
    return ids, mask, w


def _epoch_batches(
    rng: random.Random, facts: list[Example], filler: list[Example], epoch: int, cfg: TrainConfig
) -> list[list[Example]]:
    items = list(facts)
    if filler and cfg.filler_per_epoch > 0:
        k = min(cfg.filler_per_epoch, len(filler))
        start = (epoch * k) % len(filler)
        items += [filler[(start + j) % len(filler)] for j in range(k)]
    rng.shuffle(items)
    items = _pack(rng, items, cfg)
    # light length bucketing: sort inside windows of 16 batches, then shuffle the batches
    window = cfg.batch_size * 16
    batches = []
    for s in range(0, len(items), window):
        chunk = sorted(items[s : s + window], key=lambda e: len(e.ids))
        batches += [chunk[j : j + cfg.batch_size] for j in range(0, len(chunk), cfg.batch_size)]
    rng.shuffle(batches)
    return batches


def plan_steps(fact_examples: list[Example], plain_examples: list[Example], cfg: TrainConfig) -> int:
    """Number of optimiser steps :func:`train_model` will take with these examples and settings."""
    rng = random.Random(cfg.seed)
    return sum(len(_epoch_batches(rng, fact_examples, plain_examples, e, cfg)) for e in range(cfg.epochs))


def train_model(
    model: Any,
    fact_examples: list[Example],
    plain_examples: list[Example],
    cfg: TrainConfig,
    *,
    pad_id: int,
    progress: Progress | None = None,
    eval_hook: Callable[[int, Any], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place on CPU (or wherever it lives). Returns a small log dict.

    ``progress(step, total_steps)`` is called after every optimiser step; ``eval_hook(epoch, model)`` after each
    epoch (for experiments). The thread count is set to ``cfg.num_threads`` for the duration and restored after.
    """
    import torch

    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        return _train(model, fact_examples, plain_examples, cfg, pad_id, progress, eval_hook)
    finally:
        torch.set_num_threads(old_threads)


def _train(model, fact_examples, plain_examples, cfg, pad_id, progress, eval_hook) -> dict[str, Any]:
    import torch

    from kedit.core.batching import device_of

    rng = random.Random(cfg.seed)
    plans = [_epoch_batches(rng, fact_examples, plain_examples, e, cfg) for e in range(cfg.epochs)]
    total = sum(len(p) for p in plans)
    warmup = max(1, int(cfg.warmup_frac * total))

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "wte" not in name and "embed" not in name else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=cfg.betas,
        eps=1e-8,
    )

    def lr_at(step: int) -> float:
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    device = device_of(model)
    model.train()
    step = 0
    t0 = time.time()
    losses: list[float] = []
    for epoch, batches in enumerate(plans):
        ep_loss, ep_n = 0.0, 0
        for batch in batches:
            ids, mask, w = (t.to(device) for t in _collate(batch, pad_id))
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            logits = model(input_ids=ids, attention_mask=mask).logits
            lp = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)).float(), ids[:, 1:].reshape(-1), reduction="none"
            )
            ww = w[:, 1:].reshape(-1)
            loss = (lp * ww).sum() / ww.sum().clamp_min(1e-6)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            ep_loss += float(loss.detach())
            ep_n += 1
            if progress is not None:
                progress(step, total)
        losses.append(ep_loss / max(1, ep_n))
        logger.info("epoch %d/%d loss %.4f (%.0fs)", epoch + 1, cfg.epochs, losses[-1], time.time() - t0)
        if eval_hook is not None:
            model.eval()
            eval_hook(epoch, model)
            model.train()
    model.eval()
    return {"steps": total, "epoch_loss": losses, "seconds": time.time() - t0}
