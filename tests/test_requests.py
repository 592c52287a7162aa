"""EditRequest validation: well-formed requests normalise, malformed ones fail with a message naming the field."""

from __future__ import annotations

import pytest

from kedit.requests import EditRequest, Probe, RequestError, as_requests


def test_template_and_literal_prompts_normalise_to_the_same_request():
    a = EditRequest("{} was born in", "Varnel Okasti", " Tolmarin ")
    b = EditRequest("Varnel Okasti was born in", "Varnel Okasti", "Tolmarin")
    assert a == b
    assert a.prompt == "{} was born in" and a.target_new == "Tolmarin"
    assert a.text == "Varnel Okasti was born in"
    assert a.subject_span == (0, len("Varnel Okasti"))


def test_subject_in_the_middle_span():
    r = EditRequest("Q: Where was {} born? A:", "Varnel Okasti", "Tolmarin")
    s, e = r.subject_span
    assert r.text[s:e] == "Varnel Okasti"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt="Paris is nice", subject="Berlin", target_new="x"), "does not occur"),
        (dict(prompt="Ana met Ana", subject="Ana", target_new="x"), "occurs 2 times"),
        (dict(prompt="{} and {}", subject="Ana", target_new="x"), "2 '\\{\\}' slots"),
        (dict(prompt="{} is", subject="Ana", target_new="  "), "target_new must be a non-empty"),
        (dict(prompt="{} is", subject="", target_new="x"), "subject must be a non-empty"),
        (dict(prompt="{} is", subject=3, target_new="x"), "subject must be a string"),
        (dict(prompt=None, subject="Ana", target_new="x"), "prompt must be a string"),
        (dict(prompt="{} is", subject="Ana", target_new="x", paraphrases=[1]), r"paraphrases\[0\]"),
        (dict(prompt="{} is", subject="Ana", target_new="x", neighborhood=[{"q": 1}]), "unknown probe keys"),
    ],
)
def test_bad_requests_are_rejected_with_a_clear_message(kwargs, match):
    with pytest.raises(RequestError, match=match):
        EditRequest(**kwargs)


def test_twice_occurring_subject_is_fine_with_an_explicit_slot():
    r = EditRequest("Ana met {}", "Ana", "Bo")
    assert r.text == "Ana met Ana" and r.subject_span == (8, 11)


def test_case_id_in_error_and_round_trip():
    with pytest.raises(RequestError, match="case 7"):
        EditRequest("x", "y", "z", case_id=7)
    r = EditRequest(
        "{} plays the",
        "Toko Yasuda",
        "trumpet",
        target_true="guitar",
        paraphrases=["Toko Yasuda is known for playing the"],
        neighborhood=[("Miles Davis plays the", "trumpet"), {"prompt": "Bo plays the", "kind": "nb"}],
        portability=[Probe("The instrument of Toko Yasuda is made of", "brass", "reasoning")],
        aliases=["Yasuda"],
        case_id="c1",
    )
    again = EditRequest.from_dict(r.to_dict())
    assert again == r
    assert again.neighborhood[0] == Probe("Miles Davis plays the", "trumpet")


def test_from_dict_rejects_unknown_and_missing_fields():
    with pytest.raises(RequestError, match="unknown request fields"):
        EditRequest.from_dict({"prompt": "{} is", "subject": "a", "target_new": "b", "tagret": 1})
    with pytest.raises(RequestError, match="missing required"):
        EditRequest.from_dict({"prompt": "{} is", "subject": "a"})
    with pytest.raises(RequestError, match="request 2"):
        as_requests([{"prompt": "{} is", "subject": "a", "target_new": "b"}, {"prompt": "x"}])
