"""Error policy (strict / collect), malformed records, limit, JSON Lines, kedit format, in-memory parsing."""

from __future__ import annotations

import json
import logging

import pytest

from kedit.data import (
    FORMATS,
    DataFormatError,
    RecordProblem,
    SentimentTopic,
    UnsupportedForEditingError,
    classify_record,
    detect_format,
    dump_requests,
    load_dataset,
    load_requests,
    parse_records,
    sentiment_requests,
)
from kedit.requests import EditRequest, Probe


# -- malformed records ---------------------------------------------------------------------------------------------
def test_bad_target_strict_names_file_index_field(malformed_dir):
    path = malformed_dir / "counterfact_bad_target.json"
    with pytest.raises(DataFormatError) as info:
        load_requests(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.path, err.index, err.field) == (str(path), 1, "requested_rewrite.target_new.str")
    # named by its own case_id and its 1-based position (the second record; err.index stays 0-based)
    assert err.case_id == "2"
    assert str(err) == (
        f"{path}, case 2 (record 2), field 'requested_rewrite.target_new.str': missing required field"
    )


def test_bad_target_collect_keeps_the_rest(malformed_dir, caplog):
    path = malformed_dir / "counterfact_bad_target.json"
    with caplog.at_level(logging.WARNING, logger="kedit.data"):
        reqs, problems = load_requests(path, errors="collect")
    assert [r.case_id for r in reqs] == ["1", "3"]
    assert problems == [
        RecordProblem(str(path), 1, "requested_rewrite.target_new.str", "missing required field", case_id="2")
    ]
    assert "skipped 1 of 3" in caplog.text
    assert reqs[1].neighborhood == (Probe("Epsilon Person is a citizen of", "Peru", "neighborhood"),)


def test_jsonl_bad_line_and_missing_field(malformed_dir):
    path = malformed_dir / "zsre_bad_line.jsonl"
    with pytest.raises(DataFormatError) as info:
        load_requests(path)
    assert info.value.index == 1 and info.value.field is None
    assert "invalid JSON on line 2" in str(info.value)
    reqs, problems = load_requests(path, errors="collect")
    assert [r.subject for r in reqs] == ["Alpha Corp", "Gamma Corp"]
    assert [(p.index, p.field) for p in problems] == [(1, None), (3, "alt")]
    assert str(problems[1]) == f"{path}, record 4, field 'alt': missing required field"  # no case_id: 1-based
    assert reqs[1].neighborhood == ()  # no loc in that record
    assert load_requests(path, limit=1)[0].target_new == "bread"  # limit stops before the bad line


def test_knowedit_bad_nested_field(malformed_dir):
    path = malformed_dir / "knowedit_bad_locality.json"
    with pytest.raises(DataFormatError) as info:
        load_requests(path)
    assert info.value.index == 1
    assert info.value.field == "locality.Relation_Specificity[0].ground_truth[0]"
    assert "got int: 300" in str(info.value)


def test_mquake_missing_new_answer(malformed_dir):
    with pytest.raises(DataFormatError, match=r"case 9 \(record 1\), field 'new_answer': missing required field"):
        load_dataset(malformed_dir / "mquake_missing_answer.json")


def test_subject_not_in_prompt_is_named(malformed_dir):
    path = malformed_dir / "easyedit_subject_missing.json"
    with pytest.raises(DataFormatError) as info:
        load_requests(path)
    assert (info.value.index, info.value.field) == (1, "subject")
    assert "'Zeta Person' does not occur in prompt" in str(info.value)


def test_truncated_json_is_a_file_error(malformed_dir):
    path = malformed_dir / "truncated.json"
    with pytest.raises(
        DataFormatError, match=r"truncated.json: invalid JSON: .* at line 2, column 47"
    ) as info:
        load_requests(path, errors="collect")  # a broken array cannot be partly recovered
    assert info.value.index is None


def test_forced_wrong_format_hints(data_dir):
    with pytest.raises(
        DataFormatError,
        match=r"field 'src'.*format='zsre' was forced; the record looks like "
        r"'easyedit'",
    ):
        load_requests(data_dir / "counterfact/easyedit/counterfact-edit_sample.json", format="zsre")


def test_bad_arguments(data_dir):
    path = data_dir / "counterfact/easyedit/counterfact-edit_sample.json"
    with pytest.raises(ValueError, match="unknown format"):
        load_requests(path, format="nope")
    with pytest.raises(ValueError, match="errors must be"):
        load_requests(path, errors="ignore")  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="limit"):
        load_requests(path, limit=-1)


def test_undetectable_and_empty(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps([{"foo": 1}]))
    with pytest.raises(DataFormatError, match="cannot detect the format"):
        load_requests(p)
    p.write_text("[]")
    with pytest.raises(DataFormatError, match="no records"):
        load_requests(p)
    assert load_requests(p, format="kedit") == []
    p.write_text(json.dumps({"foo": []}))
    with pytest.raises(DataFormatError, match="not a known container"):
        load_requests(p)


def test_csv_unsupported(tmp_path):
    p = tmp_path / "kg.csv"
    p.write_text("head,relation,tail\nAmerica,capital,Washington_D.C.\n")
    with pytest.raises(UnsupportedForEditingError, match="CSV"):
        load_requests(p)


# -- limit / JSON Lines ---------------------------------------------------------------------------------------------
def test_limit(data_dir):
    path = data_dir / "knowedit/ZsRE_ccks2024_copy/ZsRE-test-all_sample.json"
    assert [r.subject for r in load_requests(path, limit=3)] == [r.subject for r in load_requests(path)[:3]]
    assert load_requests(path, limit=0) == []
    assert len(load_requests(path, limit=10_000)) == 100


@pytest.mark.parametrize(
    "rel",
    [
        "counterfact/easyedit/counterfact-edit_sample.json",
        "zsre/zsre_mend_train-1k_sample.json",
        "knowedit/WikiBio/wikibio-test-all_sample.json",
        "mquake/MQuAKE-hard_sample.json",
    ],
)
def test_jsonl_equals_json(data_dir, tmp_path, rel):
    records = json.loads((data_dir / rel).read_text(encoding="utf-8-sig"))
    for name in ("data.jsonl", "data_lines.json"):  # by suffix, and by content under a .json name
        out = tmp_path / name
        out.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
        assert load_dataset(out).records == load_dataset(data_dir / rel).records
        assert len(load_dataset(out, limit=7)) == 7


# -- multi-rewrite CounterFact (built from a real record) -------------------------------------------------------------
def test_counterfact_rewrite_list(data_dir, tmp_path):
    rec = json.loads((data_dir / "counterfact/easyedit/counterfact_subject_replace_sample.json").read_text())[
        0
    ]
    single = dict(rec, requested_rewrite=[rec["requested_rewrite"]])
    second = {
        "prompt": "{} is a citizen of",
        "subject": "Jake Weber",
        "relation_id": "P27",
        "target_new": {"str": "Japan", "id": "Q17"},
        "target_true": {"str": "United States", "id": "Q30"},
    }
    double = dict(rec, requested_rewrite=[rec["requested_rewrite"], second])
    a = parse_records([rec]).requests()
    b = parse_records([single]).requests()
    assert a == b and b[0].case_id == "4496"
    c = parse_records([double]).requests()
    assert [r.case_id for r in c] == ["4496#0", "4496#1"]
    assert c[0].paraphrases == a[0].paraphrases  # they mention May Wright Sewall
    assert c[1].paraphrases == ()
    assert all(p.answer is None for p in c[0].neighborhood)  # which rewrite they belong to is unknown
    assert c[1].target_true == "United States" and c[1].extra["rewrite_index"] == 1
    assert c[0].aliases == () and c[0].extra["alternative_subject"] == "Mary Eliza Wright"


# -- kedit format -------------------------------------------------------------------------------------------------
def test_kedit_roundtrip(data_dir, tmp_path):
    reqs = load_requests(data_dir / "zsre/zsre_mend_train-1k_sample.json", limit=20)
    for name in ("reqs.json", "reqs.jsonl"):
        dump_requests(reqs, tmp_path / name)
        ds = load_dataset(tmp_path / name)
        assert ds.format == "kedit"
        assert list(ds.records) == reqs
        assert [r.extra for r in ds.records] == [r.extra for r in reqs]


def test_kedit_errors(tmp_path):
    good = EditRequest("{} was born in", "Ada", "Paris").to_dict()
    p = tmp_path / "k.json"
    p.write_text(json.dumps([good, {**good, "subject": ""}, {**good, "colour": "red"}]))
    with pytest.raises(DataFormatError) as info:
        load_requests(p, format="kedit")
    assert (info.value.index, info.value.field) == (1, "subject")
    reqs, problems = load_requests(p, format="kedit", errors="collect")
    assert len(reqs) == 1 and [(q.index, q.field) for q in problems] == [(1, "subject"), (2, "colour")]


# -- in-memory parsing, detection table ----------------------------------------------------------------------------
def test_parse_records_in_memory():
    recs = [
        {
            "prompt": "The capital of France is",
            "subject": "France",
            "target_new": "Lyon",
            "ground_truth": "Paris",
        }
    ]
    ds = parse_records(recs, source="mine")
    assert ds.format == "easyedit" and ds.path == "mine"
    assert ds[0].prompt == "The capital of {} is" and ds[0].target_true == "Paris"
    with pytest.raises(DataFormatError, match=r"^mine, record 1, field 'subject'"):
        parse_records([{**recs[0], "subject": "Spain"}], source="mine")


def test_detection_table():
    assert classify_record({"question": "q", "answer": "a"}) == "tofu"
    assert classify_record({"text": "q", "labels": "a"}) == "knowundo"
    assert classify_record({"query": "q", "object": "o", "type": "t", "paraphrased_query": "p"}) == "keti"
    assert (
        classify_record({"name": "spouse", "type": "one2one", "reverse": "spouse", "multihop": ""})
        == "oneedit"
    )
    assert classify_record({"ent": "x", "pos": [], "neg": []}) == "knowedit_convsent"
    assert classify_record([1, 2]) is None
    assert detect_format({"success": [], "locality": []}) == "knowedit_sanitation"
    assert set(FORMATS) >= {"counterfact", "easyedit", "zsre", "knowedit", "mquake", "kedit"}
    for name in ("tofu", "knowundo", "keti", "oneedit"):
        assert not FORMATS[name].editable
        with pytest.raises(UnsupportedForEditingError, match="not edit requests"):
            parse_records([{"x": 1}], format=name)


def test_convsent_topics_are_not_requests():
    recs = [
        {"ent": "Estero", "pos": [" I really like his style. ", " "], "neg": [" I don't like it at all. "]}
    ]
    ds = parse_records(recs)
    assert ds.format == "knowedit_convsent"
    assert ds[0] == SentimentTopic("Estero", ("I really like his style.",), ("I don't like it at all.",), "0")
    with pytest.raises(UnsupportedForEditingError, match="sentiment_requests"):
        ds.requests()
    (req,) = sentiment_requests(list(ds.records), "negative")
    assert req.text == "What do you think of Estero?" and req.target_new == "I don't like it at all."
    assert req.extra["opposite_responses"] == ["I really like his style."]
    with pytest.raises(ValueError):
        sentiment_requests(list(ds.records), "neutral")


def test_sanitation_train_split_shape():
    data = {
        "K_F": [
            {
                "question": "What sort of creature is a killdeer?",
                "ground_truth": "Birds",
                "target_new": "I don't know.",
                "subject": "killdeer",
            }
        ],
        "K_R": [{"question": "Who wrote Hamlet?", "ground_truth": "Shakespeare"}],
    }
    ds = parse_records(data)
    assert ds.format == "knowedit_sanitation"
    (r,) = ds.records
    assert (r.prompt, r.subject, r.target_true) == ("What sort of creature is a {}?", "killdeer", "Birds")
    assert "subject_is_question" not in r.extra
    assert ds.shared_locality == (Probe("Who wrote Hamlet?", "Shakespeare", "locality"),)
    bad = {"success": [{"question": "Q?", "ground_truth": "A"}], "locality": []}
    with pytest.raises(DataFormatError, match=r"record 1 of 'success', field 'target_new'"):
        parse_records(bad)
