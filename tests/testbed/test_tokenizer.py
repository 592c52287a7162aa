from __future__ import annotations

import pytest

from kedit.testbed import generate_world
from kedit.testbed.tokenizer import SPECIAL_TOKEN, train_tokenizer
from kedit.testbed.world import WorldConfig, training_sentences


@pytest.fixture(scope="module")
def world_and_tok():
    w = generate_world(0, WorldConfig.micro())
    text = training_sentences(w)
    tok = train_tokenizer(text["facts"] + text["two_hop"] + text["filler"], 512)
    return w, tok


def test_round_trip(world_and_tok):
    w, tok = world_and_tok
    for s in training_sentences(w)["facts"][:100] + w.filler[:50] + ["Q: Où? A: naïve ✓"]:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == s


def test_special_tokens(world_and_tok):
    _, tok = world_and_tok
    assert tok.bos_token == tok.eos_token == tok.pad_token == SPECIAL_TOKEN
    assert tok.pad_token_id is not None
    assert len(tok) <= 512


def test_person_names_are_multi_token(world_and_tok):
    w, tok = world_and_tok
    for name in w.entities["person"] + w.entities["company"]:
        assert len(tok(" " + name, add_special_tokens=False)["input_ids"]) >= 2, name


def test_prompt_tokens_are_prefix_of_sentence(world_and_tok):
    w, tok = world_and_tok
    from kedit.testbed.world import trained_pairs

    for _, s, t, o in trained_pairs(w)[:200]:
        p = tok(t.format(s), add_special_tokens=False)["input_ids"]
        f = tok(f"{t.format(s)} {o}.", add_special_tokens=False)["input_ids"]
        assert f[: len(p)] == p


def test_save_and_autotokenizer_load(world_and_tok, tmp_path):
    from transformers import AutoTokenizer

    _, tok = world_and_tok
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    back = AutoTokenizer.from_pretrained(tmp_path)
    s = "Q: Where was Varnel Okasti born? A: Tarvo."
    assert back(s)["input_ids"] == tok(s)["input_ids"]
    assert back.pad_token == SPECIAL_TOKEN


def test_deterministic(world_and_tok):
    w, tok = world_and_tok
    text = training_sentences(w)
    again = train_tokenizer(text["facts"] + text["two_hop"] + text["filler"], 512)
    assert again.get_vocab() == tok.get_vocab()
