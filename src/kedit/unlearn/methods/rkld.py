"""RKLD, reverse-KL distillation unlearning (Wang et al., 2024, "RKLD: Reverse KL-Divergence-based Knowledge
Distillation for Unlearning Personal Information in Large Language Models", arXiv 2406.01983).

The teacher is built from the original ``z_0`` and a copy strengthened on the forget set ``z_S`` (continued NLL
training, ``strengthen_epochs`` at ``strengthen_lr``): ``z_T = z_0 − α · ReLU(z_S − z_0)`` per answer position
(the "Who's Harry Potter" rule; the formula is inferred, see the design notes). The student minimises the reverse
``KL(p_θ ‖ p_T)`` on the forget answers; ``retain_weight`` (default 0, as the paper's retain term is not
confirmed) adds ``KL(p_θ ‖ p_0)`` on the retain answers.
"""

from __future__ import annotations

import torch

from .base import UnlearnTrainer
from .losses import reverse_kl, rkld_teacher_logits, token_mean_nll
from .registry import register_unlearn_method


class StrengthenTrainer(UnlearnTrainer):
    """Plain NLL on the forget answers (builds RKLD's strengthened model)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids, mask, labels = self.part(inputs, "forget")
        return token_mean_nll(model(input_ids=ids, attention_mask=mask).logits, labels)


class RKLDTrainer(UnlearnTrainer):
    needs_reference = True
    needs_strengthened = True

    def __init__(self, *args, strengthened=None, **kw) -> None:
        super().__init__(*args, **kw)
        if strengthened is None:
            raise ValueError("RKLD needs the strengthened model")
        self.strengthened = strengthened.eval()
        for p in self.strengthened.parameters():
            p.requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids, mask, labels = self.part(inputs, "forget")
        out = model(input_ids=ids, attention_mask=mask)
        pos = labels[:, 1:] != -100
        with torch.no_grad():
            z0 = self.ref()(input_ids=ids, attention_mask=mask).logits[:, :-1]
            self.strengthened.to(z0.device)
            zs = self.strengthened(input_ids=ids, attention_mask=mask).logits[:, :-1]
            zt = rkld_teacher_logits(z0.float(), zs.float(), self.ucfg.alpha)
        loss = self.ucfg.forget_weight * reverse_kl(out.logits[:, :-1], zt, pos)
        r = self.part(inputs, "retain")
        if r is not None and self.ucfg.retain_weight:
            rids, rmask, rlabels = r
            zr = model(input_ids=rids, attention_mask=rmask).logits[:, :-1]
            with torch.no_grad():
                zr0 = self.ref()(input_ids=rids, attention_mask=rmask).logits[:, :-1]
            loss = loss + self.ucfg.retain_weight * reverse_kl(zr, zr0, rlabels[:, 1:] != -100)
        return (loss, out) if return_outputs else loss


__all__ = ["RKLDTrainer", "StrengthenTrainer", "token_mean_nll"]

register_unlearn_method(
    "rkld",
    RKLDTrainer,
    paper="Wang et al., RKLD: Reverse KL-Divergence-based Knowledge Distillation for Unlearning Personal "
    "Information in Large Language Models, 2024 (NAACL 2025 as RKLU)",
    summary="reverse-KL distillation from a teacher that suppresses the logits strengthening on the forget set "
    "raises",
    defaults={"alpha": 2.0, "retain_weight": 0.0},
)
