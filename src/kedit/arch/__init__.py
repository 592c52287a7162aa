"""Architecture adapters: every piece of knowledge about module names and weight layout lives here.

An :class:`ArchAdapter` maps kedit's canonical *slots* to the module paths of one Hugging Face model family:

========== ===================================================================================================
slot        meaning
========== ===================================================================================================
embed       token embedding module
layers      the ``ModuleList`` of decoder blocks (per-layer slots below are relative to one block)
attn        the self-attention module of a block
attn_out    the attention output projection (its output is added to the residual stream, modulo post-norms)
mlp         the MLP module of a block
mlp_in      the MLP up projection (``c_fc`` / ``fc_in`` / ``up_proj``)
mlp_gate    the gate projection of gated MLPs (``None`` for GELU MLPs)
mlp_out     the MLP output projection -- ROME's ``W_out``; its *input* is the key k, its output the value v
final_norm  the final norm before the unembedding
unembed     the LM head
========== ===================================================================================================

Weight orientation is decided from the module type (``transformers.pytorch_utils.Conv1D`` stores ``[in, out]``),
never guessed from shapes -- shape guessing silently fails on square matrices. Methods work in *math
orientation* (``W ∈ R^{out × in}``, ``v = W k``) and use :func:`math_weight` / :meth:`ArchAdapter.to_storage`.

Adapters are chosen from ``model.config.model_type``; :func:`register_adapter` adds new families.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "ArchAdapter",
    "UnsupportedArchitectureError",
    "SLOTS",
    "LAYER_SLOTS",
    "get_adapter",
    "register_adapter",
    "registered_model_types",
    "is_transposed",
    "math_weight",
    "to_storage",
]

#: slots addressed without a layer index
GLOBAL_SLOTS = ("embed", "layers", "final_norm", "unembed")
#: slots addressed per layer (relative to one decoder block)
LAYER_SLOTS = ("block", "attn", "attn_out", "mlp", "mlp_in", "mlp_gate", "mlp_out")
SLOTS = GLOBAL_SLOTS + LAYER_SLOTS


class UnsupportedArchitectureError(ValueError):
    """The model's ``model_type`` has no registered adapter."""


@dataclass(frozen=True)
class ArchAdapter:
    """Canonical slot → module path table for one model family.

    Global paths are relative to the model root; per-layer paths are relative to one decoder block.
    """

    model_types: tuple[str, ...]
    embed: str
    layers: str
    final_norm: str
    unembed: str
    attn: str
    attn_out: str
    mlp: str
    mlp_in: str
    mlp_out: str
    mlp_gate: str | None = None
    #: whether the block applies a norm to the MLP output before adding it to the residual (Gemma-2/3)
    mlp_post_norm: bool = False

    # -- paths -------------------------------------------------------------------------------------------------
    def path(self, slot: str, layer: int | None = None) -> str:
        """Dotted module path of ``slot`` (at ``layer`` for per-layer slots)."""
        if slot in GLOBAL_SLOTS:
            if layer is not None:
                raise ValueError(f"slot {slot!r} is global and takes no layer index")
            return getattr(self, slot)
        if slot not in LAYER_SLOTS:
            raise ValueError(f"unknown slot {slot!r}; known slots: {', '.join(SLOTS)}")
        if layer is None:
            raise ValueError(f"slot {slot!r} is per-layer: give a layer index")
        if slot == "block":
            return f"{self.layers}.{layer}"
        rel = getattr(self, slot)
        if rel is None:
            raise ValueError(f"slot {slot!r} does not exist for model types {self.model_types}")
        return f"{self.layers}.{layer}.{rel}"

    def num_layers(self, model: nn.Module) -> int:
        return len(model.get_submodule(self.layers))

    def check_layer(self, model: nn.Module, layer: int) -> int:
        """Return ``layer`` (negative indices count from the end) or raise a clear error."""
        n = self.num_layers(model)
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise ValueError(f"layer index must be an int, got {layer!r}")
        idx = layer + n if layer < 0 else layer
        if not 0 <= idx < n:
            raise ValueError(f"layer {layer} is out of range for a model with {n} layers (0..{n - 1})")
        return idx

    def module(self, model: nn.Module, slot: str, layer: int | None = None) -> nn.Module:
        if slot == "unembed" and layer is None:
            # the LM head moved between transformers versions (GPT-NeoX: ``embed_out`` in 4.x, ``lm_head`` in 5.x);
            # ``get_output_embeddings`` is the stable way to reach it, the table's path the fallback
            head = getattr(model, "get_output_embeddings", lambda: None)()
            if isinstance(head, nn.Module):
                return head
        if layer is not None:
            layer = self.check_layer(model, layer)
        return model.get_submodule(self.path(slot, layer))

    def weight_name(self, slot: str, layer: int | None = None) -> str:
        """Parameter name of a projection slot's weight (``...c_proj.weight``)."""
        return f"{self.path(slot, layer)}.weight"

    # -- sizes -------------------------------------------------------------------------------------------------
    def hidden_size(self, model: nn.Module) -> int:
        return int(math_weight(self.module(model, "mlp_out", 0)).shape[0])

    def key_size(self, model: nn.Module, layer: int = 0) -> int:
        """Dimension of the key (input of the MLP output projection)."""
        return int(math_weight(self.module(model, "mlp_out", layer)).shape[1])

    # -- orientation -------------------------------------------------------------------------------------------
    @staticmethod
    def to_storage(module: nn.Module, delta: torch.Tensor) -> torch.Tensor:
        return to_storage(module, delta)


def is_transposed(module: nn.Module) -> bool:
    """True when the module stores its weight as ``[in, out]`` (GPT-2 style ``Conv1D``)."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return True
    if isinstance(module, nn.Linear):
        return False
    raise TypeError(f"cannot tell the weight orientation of {type(module).__name__}: expected Linear or Conv1D")


def math_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as a ``[out, in]`` view (no copy)."""
    w = module.weight
    return w.T if is_transposed(module) else w


def to_storage(module: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """Convert a ``[out, in]`` math-orientation matrix to the module's storage orientation."""
    return delta.T if is_transposed(module) else delta


def _gpt2_like(types: tuple[str, ...], attn_out: str, mlp_in: str, mlp_out: str) -> ArchAdapter:
    return ArchAdapter(
        model_types=types,
        embed="transformer.wte",
        layers="transformer.h",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        attn="attn",
        attn_out=attn_out,
        mlp="mlp",
        mlp_in=mlp_in,
        mlp_out=mlp_out,
    )


def _llama_like(types: tuple[str, ...], *, mlp_post_norm: bool = False) -> ArchAdapter:
    return ArchAdapter(
        model_types=types,
        embed="model.embed_tokens",
        layers="model.layers",
        final_norm="model.norm",
        unembed="lm_head",
        attn="self_attn",
        attn_out="self_attn.o_proj",
        mlp="mlp",
        mlp_in="mlp.up_proj",
        mlp_gate="mlp.gate_proj",
        mlp_out="mlp.down_proj",
        mlp_post_norm=mlp_post_norm,
    )


def _builtin() -> dict[str, ArchAdapter]:
    adapters = [
        _gpt2_like(("gpt2",), "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
        _gpt2_like(("gptj",), "attn.out_proj", "mlp.fc_in", "mlp.fc_out"),
        _gpt2_like(("gpt_neo",), "attn.attention.out_proj", "mlp.c_fc", "mlp.c_proj"),
        ArchAdapter(
            model_types=("gpt_neox",),
            embed="gpt_neox.embed_in",
            layers="gpt_neox.layers",
            final_norm="gpt_neox.final_layer_norm",
            unembed="lm_head",  # transformers >= 5 (`embed_out` in 4.x; `module()` asks the model)
            attn="attention",
            attn_out="attention.dense",
            mlp="mlp",
            mlp_in="mlp.dense_h_to_4h",
            mlp_out="mlp.dense_4h_to_h",
        ),
        _llama_like(("llama", "mistral", "qwen2", "qwen3", "gemma")),
        _llama_like(("gemma2", "gemma3_text"), mlp_post_norm=True),
    ]
    return {t: a for a in adapters for t in a.model_types}


_REGISTRY: dict[str, ArchAdapter] = _builtin()


def register_adapter(adapter: ArchAdapter, *, overwrite: bool = False) -> None:
    """Register ``adapter`` for each of its ``model_types``.

    Example::

        register_adapter(dataclasses.replace(get_adapter_for_type("llama"), model_types=("my_llama",)))
    """
    for t in adapter.model_types:
        if t in _REGISTRY and not overwrite:
            raise ValueError(f"an adapter for model_type {t!r} is already registered; pass overwrite=True")
    for t in adapter.model_types:
        _REGISTRY[t] = adapter


def registered_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_adapter(model_or_config: Any) -> ArchAdapter:
    """The adapter for a model (or config, or ``model_type`` string), chosen by ``config.model_type``."""
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", None)
        if model_type is None:
            raise UnsupportedArchitectureError(
                f"{type(model_or_config).__name__} has no config.model_type; pass a Hugging Face model"
            )
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} has no kedit architecture adapter (supported: "
            f"{', '.join(registered_model_types())}). Register one with kedit.arch.register_adapter("
            "ArchAdapter(model_types=(" + repr(model_type) + ",), embed=..., layers=..., final_norm=..., "
            "unembed=..., attn=..., attn_out=..., mlp=..., mlp_in=..., mlp_out=...))"
        ) from None


def replace(adapter: ArchAdapter, **changes: Any) -> ArchAdapter:
    """Copy of ``adapter`` with some fields changed (e.g. a new ``model_types`` for a fork)."""
    return dataclasses.replace(adapter, **changes)
