"""What every unlearning method shares: its config, the forget/retain batches and a ``transformers.Trainer``
subclass whose ``compute_loss`` each method overrides (the open-unlearning convention, Dorna et al., 2025).

A batch holds ``forget_*`` and ``retain_*`` tensors: every forget item once per epoch, each paired with a retain item
drawn by a seeded permutation (cycled when the retain set is smaller). Text is ``question ␣answer`` with the
loss on the answer tokens only (``labels`` is ``-100`` on the prompt and padding).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Trainer

__all__ = [
    "ForgetRetainData",
    "UnlearnConfig",
    "UnlearnTrainer",
    "encode_qa",
]


@dataclass
class UnlearnConfig:
    """Settings of one unlearning run (numbers and flags only; a method uses the fields it needs).

    Defaults are sized for the testbed models (a few million parameters, answers of a few tokens); the papers'
    large-model defaults (TOFU: lr 1e-5, 10 epochs, batch 32) do not move them in a handful of steps.
    """

    epochs: float = 5.0
    lr: float = 1e-4
    batch_size: int = 16
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    max_steps: int = -1
    seed: int = 0
    #: weight of the forget term (GradDiff/NPO/SimNPO: γ) and of the retain term (α)
    forget_weight: float = 1.0
    retain_weight: float = 1.0
    #: the retain term of GradDiff / NPO / SimNPO: ``"nll"`` (NLL of the retain answers) or ``"kl"``
    #: (``KL(p_θ ‖ p_0)`` to the frozen original over the retain answer positions, the distribution kept whole)
    retain_loss: str = "nll"
    #: per-item saturation of the forget term (NPO / SimNPO): ``"none"``; ``"holdout"``: an item stops being pushed
    #: once its mean answer-token NLL reaches the ``saturation_quantile`` quantile of the *original* model's NLL on
    #: the split's never-trained holdout items of the same relation; ``"holdout_pair"``: each forget item is paired
    #: (seeded) with one holdout item of its relation and stops at that item's NLL (the spread of never-trained
    #: losses kept). No retain model is involved (:func:`kedit.unlearn.run.saturation_levels`).
    saturation: str = "none"
    saturation_quantile: float = 0.5
    #: retain items paired with each forget item (the retain part of a batch has ``batch_size × retain_pairs``
    #: rows); the pairing is fixed for the run, so with 1 only ``len(forget)`` retain items are ever seen
    retain_pairs: int = 1
    #: NPO / SimNPO inverse temperature; SimNPO margin δ
    beta: float = 0.1
    delta: float = 0.0
    #: RKLD teacher strength α, strengthened-model epochs and learning rate
    alpha: float = 2.0
    strengthen_epochs: float = 5.0
    strengthen_lr: float = 3e-4
    #: RMU: layer of the steered activations, coefficient (× mean token norm of the original activations there),
    #: and how many layers below it (MLP weights) are trained
    rmu_layer: int = -1
    rmu_coeff: float = 2.0
    rmu_span: int = 3
    #: LoRA variant: rank, alpha, target module-name suffixes (empty: the MLP projections of every layer)
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()
    #: full-weight runs leave the token and position embeddings (tied to the LM head) alone: every forget answer is
    #: an entity that retain facts share, and moving its embedding moves them all
    freeze_embeddings: bool = True
    max_length: int = 128
    #: MemFlex localisation: random-label copies per item, fraction of answer tokens replaced, and the thresholds
    #: of the located region {k : cos(g_unlearn[k], g_retain[k]) < μ and mean|g_unlearn[k]| > σ}
    memflex_copies: int = 3
    memflex_label_noise: float = 0.5
    memflex_cos_threshold: float = 0.92
    memflex_grad_threshold: float = 6e-4

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    def replace(self, **kw: Any) -> UnlearnConfig:
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise ValueError(f"unknown unlearning setting(s) {unknown}; known: {sorted(names)}")
        return dataclasses.replace(self, **kw)


def encode_qa(tok: Any, question: str, answer: str, max_length: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of ``question ␣answer`` with the labels on the answer tokens only."""
    from kedit.core.keys import target_ids

    q = list(tok(question, add_special_tokens=True)["input_ids"])
    a = target_ids(tok, answer)
    ids = (q + a)[:max_length]
    labels = ([-100] * len(q) + a)[:max_length]
    if all(x == -100 for x in labels):
        raise ValueError(f"question {question[:60]!r} leaves no answer token within max_length={max_length}")
    return ids, labels


class ForgetRetainData(torch.utils.data.Dataset):
    """Forget items each paired with a retain item (seeded), as encoded id lists."""

    def __init__(
        self,
        tok: Any,
        forget: Sequence[Any],
        retain: Sequence[Any],
        *,
        seed: int,
        max_length: int,
        forget_caps: Sequence[float] | None = None,
        retain_pairs: int = 1,
    ):
        if not forget:
            raise ValueError("the forget set is empty")
        if forget_caps is not None and len(forget_caps) != len(forget):
            raise ValueError(f"{len(forget_caps)} saturation levels for {len(forget)} forget items")
        self.forget_caps = None if forget_caps is None else [float(c) for c in forget_caps]
        self.forget = [encode_qa(tok, it.question, it.answer, max_length) for it in forget]
        self.retain = [encode_qa(tok, it.question, it.answer, max_length) for it in retain]
        if retain_pairs < 1:
            raise ValueError(f"retain_pairs must be ≥ 1, got {retain_pairs}")
        order = list(range(len(self.retain)))
        random.Random(seed).shuffle(order)
        k = retain_pairs
        #: retain partners of forget item i: the next k of the seeded order (cycled when the retain set is smaller)
        self.pairs = [[order[(i * k + j) % len(order)] for j in range(k)] for i in range(len(self.forget))] \
            if order else []
        self.pair = [p[0] for p in self.pairs]

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, i: int) -> dict[str, Any]:
        out: dict[str, Any] = {"forget": self.forget[i]}
        if self.forget_caps is not None:
            out["forget_cap"] = self.forget_caps[i]
        if self.pairs:
            ps = self.pairs[i]
            out["retain"] = self.retain[ps[0]] if len(ps) == 1 else [self.retain[j] for j in ps]
        return out


def collate(pad: int) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Right-pad each part (``forget``, ``retain``) of a list of items into ``<part>_input_ids`` /
    ``<part>_attention_mask`` / ``<part>_labels``."""

    def fn(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for part in ("forget", "retain"):
            rows = []
            for b in batch:
                if part in b:  # one (ids, labels) pair, or a list of them (retain_pairs > 1)
                    rows.extend(b[part] if isinstance(b[part], list) else [b[part]])
            if not rows:
                continue
            width = max(len(ids) for ids, _ in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            labels = torch.full((len(rows), width), -100, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, (x, y) in enumerate(rows):
                ids[r, : len(x)] = torch.tensor(x)
                labels[r, : len(y)] = torch.tensor(y)
                mask[r, : len(x)] = 1
            out[f"{part}_input_ids"], out[f"{part}_attention_mask"], out[f"{part}_labels"] = ids, mask, labels
        if all("forget_cap" in b for b in batch):
            out["forget_cap"] = torch.tensor([float(b["forget_cap"]) for b in batch], dtype=torch.float32)
        return out

    return fn


class UnlearnTrainer(Trainer):
    """``Trainer`` with the unlearning context: the frozen original (``ref_model``, when the method needs one)
    and the config. Subclasses implement :meth:`compute_loss`."""

    #: the method needs the frozen original model (NPO, RMU, RKLD, GradDiff-KL)
    needs_reference: bool = False

    def __init__(self, *args: Any, unlearn_config: UnlearnConfig, ref_model: Any = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.ucfg = unlearn_config
        self.ref_model = ref_model
        if ref_model is not None:
            ref_model.eval()
            for p in ref_model.parameters():
                p.requires_grad_(False)

    @staticmethod
    def part(inputs: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        if f"{name}_input_ids" not in inputs:
            return None
        return inputs[f"{name}_input_ids"], inputs[f"{name}_attention_mask"], inputs[f"{name}_labels"]

    def ref(self) -> Any:
        """The frozen original, on the student's device."""
        if self.ref_model is None:
            raise RuntimeError(f"{type(self).__name__} needs the frozen original model (ref_model)")
        dev = next(self.model.parameters()).device
        if next(self.ref_model.parameters()).device != dev:
            self.ref_model.to(dev)
        return self.ref_model

    def retain_nll(self, model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The retain term of GradDiff-style methods on the paired retain answers (0 without retain data): their
        NLL (``retain_loss="nll"``) or ``KL(p_θ ‖ p_0)`` to the frozen original at the answer positions
        (``retain_loss="kl"``, the retain term of RKLD)."""
        from .losses import reverse_kl, token_mean_nll

        r = self.part(inputs, "retain")
        if r is None or self.ucfg.retain_weight == 0:
            return torch.zeros((), device=next(model.parameters()).device)
        ids, mask, labels = r
        logits = model(input_ids=ids, attention_mask=mask).logits
        if self.ucfg.retain_loss == "nll":
            return token_mean_nll(logits, labels)
        if self.ucfg.retain_loss == "kl":
            with torch.no_grad():
                z0 = self.ref()(input_ids=ids, attention_mask=mask).logits[:, :-1]
            return reverse_kl(logits[:, :-1], z0, labels[:, 1:] != -100)
        raise ValueError(f"unknown retain_loss {self.ucfg.retain_loss!r} (nll, kl)")

    @staticmethod
    def saturation_mask(inputs: dict[str, torch.Tensor], mean_nll: torch.Tensor) -> torch.Tensor | None:
        """Per forget item, 1.0 while its mean answer-token NLL is below its saturation level (``forget_cap``,
        from :func:`kedit.unlearn.run.saturation_levels`) and 0.0 once it has reached it (detached); ``None``
        when saturation is off."""
        cap = inputs.get("forget_cap")
        if cap is None:
            return None
        return (mean_nll.detach() < cap.to(mean_nll.device)).to(mean_nll.dtype)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # pragma: no cover
        raise NotImplementedError
