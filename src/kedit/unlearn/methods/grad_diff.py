"""Gradient difference: ascend on the forget answers, descend on the retain answers (Liu et al., 2022,
"Continual Learning and Private Unlearning"; TOFU's GradDiff baseline)."""

from __future__ import annotations

from .base import UnlearnTrainer
from .losses import token_mean_nll
from .registry import register_unlearn_method


class GradDiffTrainer(UnlearnTrainer):
    """``L = −γ · NLL(forget) + α · NLL(retain)``."""

    uses_retain_term = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids, mask, labels = self.part(inputs, "forget")
        out = model(input_ids=ids, attention_mask=mask)
        loss = -self.ucfg.forget_weight * token_mean_nll(out.logits, labels)
        loss = loss + self.ucfg.retain_weight * self.retain_nll(model, inputs)
        return (loss, out) if return_outputs else loss


register_unlearn_method(
    "grad_diff",
    GradDiffTrainer,
    paper="Liu, Lu and Zhang, Continual Learning and Private Unlearning, CoLLAs 2022 (TOFU's GradDiff)",
    summary="gradient ascent on the forget answers plus NLL on retain answers",
)
