"""Whole-word subject location: a subject that is a whole word once, inside a prompt that also holds a longer
word starting (or ending) with it, is located at the whole word; only an ambiguity that remains is refused."""

from __future__ import annotations

import pytest

from kedit.core.keys import encode_with_subject
from kedit.data._common import FieldError, build_request, place_subject
from kedit.requests import EditRequest, RequestError, as_requests, locate_subject


@pytest.mark.parametrize(
    "prompt, subject, at",
    [
        ("Annabel said that Ann was born in", "Ann", 18),
        ("Ann met Annabel in", "Ann", 0),
        ("Joanna and Anna live in", "Anna", 11),  # "Anna" also ends "Joanna"
        ("Ann-Marie thanked Annabel in", "Ann", 0),  # a hyphen is a boundary
        ("R2D2 is older than R2, made in", "R2", 19),  # digits glue too
        ("Zoëlle said that Zoë lives in", "Zoë", 17),  # non-ASCII letters glue too
        ("Toko Yasuda plays the", "Toko Yasuda", 0),  # a unique match needs no boundary
        ("The Annals of Ann", "Ann", 14),
    ],
)
def test_whole_word_occurrence_is_located(prompt, subject, at):
    assert locate_subject(prompt, subject) == at
    r = EditRequest(prompt, subject, "Paris")
    s, e = r.subject_span
    assert (s, e) == (at, at + len(subject))
    assert r.text == prompt and r.text[s:e] == subject


def test_unique_substring_inside_a_word_still_accepted():
    """One occurrence is unambiguous even when glued (as before)."""
    assert locate_subject("Annabel was born in", "Ann") == 0


@pytest.mark.parametrize(
    "prompt, subject, n, whole",
    [
        ("Ann met Ann in", "Ann", 2, 2),  # two whole words
        ("Annabel and Annette were born in", "Ann", 2, 0),  # no whole word
        ("Ann said Ann and Annabel", "Ann", 3, 2),
    ],
)
def test_remaining_ambiguity_is_refused_naming_the_record(prompt, subject, n, whole):
    with pytest.raises(RequestError, match=f"occurs {n} times .*{whole} of them as a whole word.*'{{}}'") as info:
        EditRequest(prompt, subject, "Paris", case_id="c9")
    assert "(case c9)" in str(info.value)
    with pytest.raises(RequestError, match="request 2"):
        as_requests([EditRequest("{} is", "Bo", "x"), {"prompt": prompt, "subject": subject, "target_new": "x"}])


def test_missing_subject_still_refused():
    with pytest.raises(RequestError, match="does not occur"):
        locate_subject("Annabel was born in", "Bob")


def test_dataset_loader_uses_the_same_rule():
    assert place_subject("Annabel said that Ann was born in", "Ann", "src", "subject")[1] == "Ann"
    r = build_request({"prompt": "src"}, prompt="Annabel said that Ann was born in", subject="Ann", target_new="Rome")
    assert r.prompt == "Annabel said that {} was born in"
    with pytest.raises(FieldError, match=r"occurs 2 times in src .*cannot tell"):
        place_subject("Ann met Ann in", "Ann", "src", "subject")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_testbed_tokenizers_find_the_whole_word(arch):
    """The subject's last token (where keys are read and v* is written) is in the whole-word "Ann", not in
    "Annabel"."""
    from kedit.testbed import load_testbed_model

    _, tok = load_testbed_model(arch)
    for prompt in ("Annabel said that Ann was born in", "Ann met Annabel in"):
        r = EditRequest(prompt, "Ann", "Paris")
        s, e = r.subject_span
        (enc,) = encode_with_subject(tok, [r.text], [(s, e)])
        offsets = tok(r.text, return_offsets_mapping=True)["offset_mapping"]
        a, b = offsets[enc.subject_last]
        assert a < e and b > s, (arch, prompt, offsets[enc.subject_last])  # overlaps the located word
        first_ann_end = prompt.index("Ann") + 3
        if s > 0:  # the located word is the second "Ann": the token lies past "Annabel"
            assert a >= first_ann_end + 1
