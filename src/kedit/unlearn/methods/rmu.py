"""RMU, Representation Misdirection for Unlearning (Li et al., 2024, "The WMDP Benchmark: Measuring and Reducing
Malicious Use With Unlearning", arXiv 2403.03218).

The residual stream after block ``ℓ`` is steered to ``c · u`` (``u`` a fixed random unit vector) on forget text
and kept at the original's activations on retain text; only the MLP output weights of blocks ``ℓ − span + 1 … ℓ``
are trained. WMDP picks ``c`` by hand per model (6.5 for Zephyr-7B); here ``c = rmu_coeff ×`` the mean token norm
of the original's activations at ``ℓ`` on the first forget batch, so one setting scales across models.
"""

from __future__ import annotations

import torch

from .base import UnlearnTrainer
from .registry import register_unlearn_method


def _mlp_out_names(model, layers) -> list[str]:
    from kedit.arch import get_adapter

    adapter = get_adapter(model)
    return [adapter.weight_name("mlp_out", layer) for layer in layers]


class RMUTrainer(UnlearnTrainer):
    needs_reference = True

    @classmethod
    def layer(cls, model, cfg) -> int:
        n = model.config.num_hidden_layers
        ell = cfg.rmu_layer if cfg.rmu_layer >= 0 else n // 2
        if not 0 <= ell < n:
            raise ValueError(f"rmu_layer {cfg.rmu_layer} is outside the model's {n} layers")
        return ell

    @classmethod
    def trainable_parameters(cls, model, cfg) -> list[str] | None:
        ell = cls.layer(model, cfg)
        return _mlp_out_names(model, range(max(0, ell - cfg.rmu_span + 1), ell + 1))

    def _hidden(self, model, ids, mask) -> torch.Tensor:
        ell = self.layer(model, self.ucfg)
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[ell + 1]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids, mask, _ = self.part(inputs, "forget")
        h = self._hidden(model, ids, mask).float()
        m = mask[..., None].to(h.dtype)
        if not hasattr(self, "_control"):
            with torch.no_grad():
                h0 = self._hidden(self.ref(), ids, mask).float()
                norm = (h0.norm(dim=-1) * mask).sum() / mask.sum()
                gen = torch.Generator().manual_seed(self.ucfg.seed)
                u = torch.rand(h.shape[-1], generator=gen)
                self._control = (self.ucfg.rmu_coeff * norm * u / u.norm()).to(h.device)
        forget = (((h - self._control) ** 2) * m).sum() / (m.sum() * h.shape[-1])
        loss = self.ucfg.forget_weight * forget
        r = self.part(inputs, "retain")
        if r is not None and self.ucfg.retain_weight:
            rids, rmask, _ = r
            hr = self._hidden(model, rids, rmask).float()
            with torch.no_grad():
                hr0 = self._hidden(self.ref(), rids, rmask).float()
            mr = rmask[..., None].to(hr.dtype)
            loss = loss + self.ucfg.retain_weight * (((hr - hr0) ** 2) * mr).sum() / (mr.sum() * hr.shape[-1])
        return loss


register_unlearn_method(
    "rmu",
    RMUTrainer,
    paper="Li et al., The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning, ICML 2024",
    summary="steer mid-layer activations on forget text to a random direction, keep them on retain text",
    defaults={"retain_weight": 100.0, "lr": 5e-4},
    lora=False,
)
