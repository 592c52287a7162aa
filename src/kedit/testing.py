"""Offline helpers for tests and adapter authors: tiny random models of every supported family and a tiny
byte-level BPE tokenizer trained in-process (no hub access needed).

    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["TINY_FAMILIES", "tiny_config", "tiny_model", "tiny_tokenizer", "TINY_TEXT"]

#: model types for which :func:`tiny_config` knows a small configuration
TINY_FAMILIES = ("gpt2", "gptj", "gpt_neo", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")

TINY_TEXT = (
    "The capital of France is Paris. Paris is a city in France. The Eiffel Tower is located in Paris. "
    "Danielle Darrieux was a French actress. Her mother tongue is French. Toko Yasuda plays the guitar. "
    "The Space Needle is in Seattle. Seattle is a city in the United States. Apple was founded by Steve Jobs. "
    "Q: Where was Varnel Okasti born? A: Tolmarin. Varnel Okasti works for Quenta Systems as an engineer. "
    "Miles Davis played the trumpet. The official language of Brazil is Portuguese. Berlin is in Germany. "
)


def tiny_config(model_type: str, *, vocab_size: int = 320, n_layer: int = 4, hidden: int = 32, **overrides: Any):
    """A small ``PretrainedConfig`` of ``model_type`` (4 layers, width 32, MLP 64 unless overridden)."""
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    llama_like = dict(
        num_hidden_layers=n_layer,
        hidden_size=hidden,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    specs: dict[str, dict[str, Any]] = {
        "gpt2": dict(n_layer=n_layer, n_embd=hidden, n_head=4, n_positions=128),
        "gptj": dict(n_layer=n_layer, n_embd=hidden, n_head=4, n_positions=128, rotary_dim=4, n_inner=2 * hidden),
        "gpt_neo": dict(
            num_layers=n_layer,
            hidden_size=hidden,
            num_heads=4,
            attention_types=[[["global", "local"], n_layer // 2]],
            max_position_embeddings=128,
            intermediate_size=2 * hidden,
        ),
        "gpt_neox": dict(
            num_hidden_layers=n_layer,
            hidden_size=hidden,
            num_attention_heads=4,
            intermediate_size=2 * hidden,
            max_position_embeddings=128,
        ),
        "llama": llama_like,
        "mistral": llama_like,
        "qwen2": llama_like,
        "qwen3": {**llama_like, "head_dim": hidden // 4},
        "gemma": {**llama_like, "head_dim": hidden // 4},
        "gemma2": {**llama_like, "head_dim": hidden // 4},
    }
    if model_type not in specs:
        raise ValueError(f"no tiny config for {model_type!r}; known: {', '.join(TINY_FAMILIES)}")
    return AutoConfig.for_model(model_type, **{**common, **specs[model_type], **overrides})


def tiny_model(model_type: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kw: Any):
    """A randomly initialised tiny causal LM of ``model_type`` in eval mode (deterministic given ``seed``)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, **config_kw)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.to(dtype).eval()


def tiny_tokenizer(vocab_size: int = 320, text: str = TINY_TEXT):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``text`` (pad = eos = ``<|endoftext|>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([text] * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    return tok


def nano_world_config():
    """The smallest testbed world the build code accepts (6 persons, 20 filler lines): a build of it with
    ``micro=True, epochs=1`` takes seconds, for tests of the build machinery (not of what the models learn)."""
    from kedit.testbed.world import WorldConfig

    return WorldConfig(
        n_persons=6,
        n_cities=3,
        n_countries=2,
        n_companies=2,
        n_languages=2,
        n_professions=2,
        n_instruments=2,
        n_filler=20,
    )
