"""Gradient ascent: maximise the NLL of the forget answers (Jang et al., 2023, "Knowledge Unlearning for
Mitigating Privacy Risks in Language Models", arXiv 2210.01504; TOFU's first baseline)."""

from __future__ import annotations

from .base import UnlearnTrainer
from .losses import token_mean_nll
from .registry import register_unlearn_method


class GradAscentTrainer(UnlearnTrainer):
    """``L = −NLL(forget answers)``."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids, mask, labels = self.part(inputs, "forget")
        out = model(input_ids=ids, attention_mask=mask)
        loss = -self.ucfg.forget_weight * token_mean_nll(out.logits, labels)
        return (loss, out) if return_outputs else loss


register_unlearn_method(
    "grad_ascent",
    GradAscentTrainer,
    paper="Jang et al., Knowledge Unlearning for Mitigating Privacy Risks in Language Models, ACL 2023",
    summary="gradient ascent on the forget answers",
)
