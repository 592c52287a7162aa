"""SimNPO (Fan et al., 2024, "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM
Unlearning", arXiv 2410.07163): NPO without a reference model and with length normalisation, plus retain NLL."""

from __future__ import annotations

from .base import UnlearnTrainer
from .losses import sequence_nll, simnpo_loss
from .registry import register_unlearn_method


class SimNPOTrainer(UnlearnTrainer):
    """``L = γ · −(2/β) mean log σ(β (NLL/|y| − δ)) + α · NLL(retain)``."""

    supports_saturation = True
    uses_retain_term = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids, mask, labels = self.part(inputs, "forget")
        out = model(input_ids=ids, attention_mask=mask)
        nll, n = sequence_nll(out.logits, labels)
        mean_nll = nll / n.clamp_min(1)
        w = self.saturation_mask(inputs, mean_nll)
        loss = self.ucfg.forget_weight * simnpo_loss(mean_nll, self.ucfg.beta, self.ucfg.delta, w)
        loss = loss + self.ucfg.retain_weight * self.retain_nll(model, inputs)
        return (loss, out) if return_outputs else loss


register_unlearn_method(
    "simnpo",
    SimNPOTrainer,
    paper="Fan et al., Simplicity Prevails: Rethinking Negative Preference Optimization for LLM Unlearning, 2024",
    summary="reference-free, length-normalised NPO plus retain NLL",
    defaults={"beta": 4.5, "delta": 0.0, "forget_weight": 0.125},
)
