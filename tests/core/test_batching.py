"""kedit.core.batching: the one padding helper, pad id, model device and the contradicting-requests check."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from kedit.core.batching import (
    ConflictingRequestsError,
    check_conflicts,
    conflicting_pairs,
    device_of,
    pad_batch,
    pad_id,
)
from kedit.requests import EditRequest
from kedit.testing import tiny_model, tiny_tokenizer

SEQS = [[5, 6, 7], [8], [9, 10]]


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_batch_keeps_every_token_and_masks_exactly_the_pads(side):
    ids, mask = pad_batch(SEQS, 0, side=side)
    assert ids.shape == mask.shape == (3, 3) and ids.dtype == mask.dtype == torch.long
    for row, seq in enumerate(SEQS):
        assert int(mask[row].sum()) == len(seq)
        assert ids[row][mask[row].bool()].tolist() == seq  # the real tokens, in order
        assert (ids[row][~mask[row].bool()] == 0).all()  # every other position is the pad id
        real = mask[row].nonzero().flatten().tolist()
        assert real == (list(range(len(seq))) if side == "right" else list(range(3 - len(seq), 3)))


def test_pad_batch_accepts_tensors_devices_and_rejects_bad_input():
    a, m = pad_batch([torch.tensor(s) for s in SEQS], 7, "cpu")
    b, n = pad_batch(SEQS, 7)
    assert torch.equal(a, b) and torch.equal(m, n) and a.device.type == "cpu"
    with pytest.raises(ValueError, match="side"):
        pad_batch(SEQS, 0, side="middle")
    with pytest.raises(ValueError, match="at least one"):
        pad_batch([], 0)


def test_pad_id_and_device_of():
    class Tok:
        pad_token_id = None
        eos_token_id = 3

    assert pad_id(Tok()) == 3
    Tok.pad_token_id = 1
    assert pad_id(Tok()) == 1
    assert pad_id(object()) == 0  # no pad or eos token at all
    tok = tiny_tokenizer()
    model = tiny_model("gpt2", vocab_size=len(tok))
    assert device_of(model) == model.get_input_embeddings().weight.device
    assert device_of(torch.nn.Linear(2, 2)) == torch.device("cpu")  # no input embedding: first parameter


def test_conflicting_pairs_finds_contradictions_only():
    a = EditRequest("{} plays the", "Toko", "trumpet", case_id="a")
    same = EditRequest("{} plays the", "Toko", "trumpet", case_id="dup")  # exact duplicate: not a conflict
    b = EditRequest("{} plays the", "Toko", "violin", case_id="b")
    c = EditRequest("{} sings", "Toko", "violin", case_id="c")  # same subject, another prompt: allowed here
    d = EditRequest("{} plays the", "Mira", "violin", case_id="d")  # same prompt, another subject
    e = EditRequest("{} plays the", "Toko", "drums")
    assert conflicting_pairs([a, same, b, c, d, e]) == [(0, 2), (0, 5)]
    check_conflicts([a, same, c, d], "X")  # no contradiction: no error
    with pytest.raises(ConflictingRequestsError) as err:
        check_conflicts([a, same, b, c, d, e], "X")
    msg = str(err.value)
    assert msg.startswith("X: 2 contradicting") and "case 'a' and case 'b'" in msg
    assert "case 'a' and request 6 (1-based position)" in msg and "'drums'" in msg
