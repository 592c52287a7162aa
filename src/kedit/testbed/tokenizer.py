"""Byte-level BPE tokenizer trained on the world's text, saved as a standard ``PreTrainedTokenizerFast``."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

__all__ = ["SPECIAL_TOKEN", "train_tokenizer"]

logger = logging.getLogger(__name__)

SPECIAL_TOKEN = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, *, min_frequency: int = 2) -> Any:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation) on ``texts``.

    Returns a ``transformers.PreTrainedTokenizerFast`` with ``<|endoftext|>`` as bos, eos, unk and pad token;
    save it with ``save_pretrained(dir)`` and load it back with ``AutoTokenizer.from_pretrained(dir)``.
    Training is deterministic for the same texts (in the same order) and settings.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    logger.info("trained byte-level BPE with %d tokens", tok.get_vocab_size())
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        unk_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        model_max_length=128,
        clean_up_tokenization_spaces=False,
    )
    fast.padding_side = "right"
    return fast
