"""Field mapping of each real-format loader, checked on concrete records of the real samples in tests/data/."""

from __future__ import annotations

import json

import pytest

from kedit.data import (
    LoadedDataset,
    MQuAKECase,
    MQuAKEHop,
    UnsupportedForEditingError,
    detect_format,
    load_dataset,
    load_requests,
    read_records,
)
from kedit.requests import EditRequest, Probe

# file (relative to tests/data) -> (format, records in the file, requests loadable in strict mode or None)
SAMPLES = {
    "counterfact/easyedit/counterfact-edit_sample.json": ("easyedit", 300),
    "counterfact/easyedit/counterfact_subject_replace_sample.json": ("counterfact", 100),
    "zsre/zsre_mend_train-1k_sample.json": ("zsre", 300),
    "zsre/zsre_inverse_relation_sample.json": ("zsre", 200),
    "zsre/zsre_subject_replace_sample.json": ("zsre", 200),
    "knowedit/ZsRE_ccks2024_copy/ZsRE-test-all_sample.json": ("knowedit", 100),
    "knowedit/WikiBio/wikibio-test-all_sample.json": ("knowedit", 150),
    "knowedit/Sanitation/trivia_qa_test.json": ("knowedit_sanitation", 80),
    "mquake/MQuAKE-hard_sample.json": ("mquake", 150),
}
# records whose subject does not occur in the question at all (a dataset quirk; reported, not guessed)
KNOWN_BAD = {
    "zsre/zsre_inverse_relation_sample.json": [75],
    "zsre/zsre_subject_replace_sample.json": [17, 137],
}


@pytest.mark.parametrize("rel", sorted(SAMPLES))
def test_detect_and_count(data_dir, rel):
    fmt, n = SAMPLES[rel]
    path = data_dir / rel
    raw = read_records(path)
    assert detect_format(raw, source=str(path)) == fmt
    ds = load_dataset(path, errors="collect")
    assert isinstance(ds, LoadedDataset)
    assert ds.format == fmt and ds.path == str(path)
    assert ds.n_source_records == n
    bad = KNOWN_BAD.get(rel, [])
    assert [p.index for p in ds.problems] == bad
    assert all(p.field == "subject" for p in ds.problems)
    assert len(ds) == n - len(bad)
    if not bad:  # strict mode loads the whole file
        assert len(load_dataset(path)) == n
    # every edit request of every file is JSON-serialisable and round-trips
    for req in ds.requests():
        assert EditRequest.from_dict(json.loads(json.dumps(req.to_dict()))) == req


# -- CounterFact ------------------------------------------------------------------------------------------------------
def test_easyedit_counterfact_record(data_dir):
    reqs = load_requests(data_dir / "counterfact/easyedit/counterfact-edit_sample.json")
    r = reqs[1]
    assert r.case_id == "1"
    assert r.prompt == "The official religion of {} is"
    assert r.subject == "Edwin of Northumbria"
    assert r.text == "The official religion of Edwin of Northumbria is"
    assert (r.target_new, r.target_true) == ("Islam", "Christianity")
    rephrase = (
        "Regarding individual vitamin and mineral supplementation, research shows mixed results. "
        "Edwin of Northumbria is affiliated with the religion"
    )
    assert r.paraphrases == (rephrase,)
    assert r.neighborhood == (Probe("The official religion of Paul is", "Christianity", "neighborhood"),)
    assert r.portability == () and r.aliases == ()
    assert reqs[-1].case_id == "673" and reqs[-1].subject == "Jean Debucourt"


def test_rome_counterfact_record(data_dir):
    r = load_requests(data_dir / "counterfact/easyedit/counterfact_subject_replace_sample.json")[0]
    assert r.case_id == "4496"
    assert (r.prompt, r.subject) == ("{} passed away in", "May Wright Sewall")
    assert (r.target_new, r.target_true) == ("Birmingham", "Indianapolis")
    assert r.paraphrases[0] == "Regrets\nXI. May Wright Sewall succumbed at"
    assert len(r.paraphrases) == 2
    # neighbourhood prompts keep the true object of the edited relation
    assert len(r.neighborhood) == 10
    assert r.neighborhood[0] == Probe("Jake Weber succumbed at", "Indianapolis", "neighborhood")
    assert all(p.answer == "Indianapolis" for p in r.neighborhood)
    assert r.aliases == ("Mary Eliza Wright",)  # alternative_subject
    assert r.extra["relation_id"] == "P20"
    assert r.extra["target_new_id"] == "Q2256" and r.extra["target_true_id"] == "Q6346"
    assert r.extra["pararel_idx"] == 12032
    assert r.extra["attribute_prompts"][0] == "Thomas William Bridge died in the city of"
    assert len(r.extra["generation_prompts"]) == 10


# -- zsRE ---------------------------------------------------------------------------------------------------------
def test_zsre_mend_record(data_dir):
    r = load_requests(data_dir / "zsre/zsre_mend_train-1k_sample.json")[0]  # CRLF file
    assert r.case_id == "0"
    assert (r.prompt, r.subject) == ("What is the product made by {}?", "UniFirst")
    assert r.target_new == "unmanned aircraft"  # alt
    assert r.target_true == "uniform"  # answers[0], not pred
    assert r.paraphrases == ("What will be the product of UniFirst?",)
    assert r.neighborhood == (
        Probe("nq question: john goodman's character in the big lebowski", "Walter Sobchak", "neighborhood"),
    )
    assert r.extra["pred"] == "uniform"
    assert r.extra["cond"] == "uniform >> unmanned aircraft || What is the product made by UniFirst?"


def test_zsre_inverse_relation(data_dir):
    r = load_requests(data_dir / "zsre/zsre_inverse_relation_sample.json", limit=2)[1]
    assert (r.subject, r.target_new, r.target_true) == ("Nebaioth", "Babur", "Ishmael")
    assert r.neighborhood == ()  # no loc/loc_ans in this variant
    assert r.portability == (Probe("Who is the son of Babur?", "Nebaioth", "inverse_relation"),)


def test_zsre_subject_replace_and_case_quirk(data_dir):
    reqs, problems = load_requests(data_dir / "zsre/zsre_subject_replace_sample.json", errors="collect")
    r = reqs[0]
    assert (r.subject, r.target_new, r.target_true) == ("NGC 3953", "Triangulum", "Ursa Major")
    assert r.aliases == ("UGC 6870",)
    assert r.portability == (
        Probe("What is the constellation of UGC 6870?", "Triangulum", "subject_replace"),
    )
    # record 122: subject "Saint Columba Altarpiece", question "... Saint Columba altarpiece?"
    fixed = next(q for q in reqs if q.case_id == "122")
    assert fixed.subject == "Saint Columba altarpiece"
    assert fixed.extra["dataset_subject"] == "Saint Columba Altarpiece"
    assert fixed.text == "What material was used for Saint Columba altarpiece?"
    assert str(problems[0]).endswith(
        "record 18, field 'subject': subject 'Rio Grande 463' does not occur in src "
        "'By which company, D&RGW 463 has been manufactured?' (not even ignoring case)"
    )


# -- KnowEdit ------------------------------------------------------------------------------------------------------
def test_knowedit_zsre_record(data_dir):
    reqs = load_requests(data_dir / "knowedit/ZsRE_ccks2024_copy/ZsRE-test-all_sample.json")
    r = reqs[0]
    assert (r.prompt, r.subject) == ("Which family does {} belong to?", "Epaspidoceras")
    assert (r.target_new, r.target_true) == ("Noctuidae", "Aspidoceratidae")
    assert r.paraphrases == ("What family are Epaspidoceras?",)
    assert r.neighborhood == (
        Probe("The taxon rank of Epaspidoceras is", "genus", "Relation_Specificity"),
        Probe("Epaspidoceras taxon rank", "genus", "Relation_Specificity"),
    )
    assert r.portability == (
        Probe("What is the common name for the family Epaspidoceras belongs to?", "Owlet moths", "Reasoning"),
    )
    assert r.extra["cond"] == "Geometridae >> Noctuidae || Which family does Epaspidoceras belong to?"
    # list-valued ground truth: the first is target_true, the others are kept as aliases
    multi = reqs[58]
    assert multi.subject == "Svend Poulsen"
    assert multi.target_true == "Torstenson War"
    assert multi.extra["target_true_aliases"] == ["Second Northern War", "Scanian War"]


def test_knowedit_wikibio_record(data_dir):
    r = load_requests(data_dir / "knowedit/WikiBio/wikibio-test-all_sample.json", limit=1)[0]
    assert r.subject == "john russell reynolds"
    assert r.prompt.startswith("This is a Wikipedia passage about {}. Sir John Russell Reynolds, 1st Baronet")
    assert r.target_new.startswith("He received general education from his father")
    assert r.target_true is None
    assert r.neighborhood[0] == Probe(
        "The field of work of john russell reynolds is", "medicine", "Relation_Specificity"
    )


def test_knowedit_sanitation(data_dir):
    ds = load_dataset(data_dir / "knowedit/Sanitation/trivia_qa_test.json")
    assert ds.format == "knowedit_sanitation"
    r = ds[0]
    assert r.prompt == "{}" and r.subject == "What type of creature is the Australian currawong?"
    assert r.text == r.subject
    assert (r.target_new, r.target_true) == ("I don't know.", "Birds")
    assert r.extra["subject_is_question"] is True
    assert len(ds.shared_locality) == 453
    assert ds.shared_locality[1] == Probe(
        "According to the saying what is paved with good intentions?", "The road to hell", "locality"
    )
    limited = load_dataset(data_dir / "knowedit/Sanitation/trivia_qa_test.json", limit=5)
    assert len(limited) == 5 and len(limited.shared_locality) == 453


# -- MQuAKE ------------------------------------------------------------------------------------------------------
def test_mquake_case(data_dir):
    ds = load_dataset(data_dir / "mquake/MQuAKE-hard_sample.json")
    case = ds[0]
    assert isinstance(case, MQuAKECase)
    assert case.case_id == "7417"
    assert len(case.edits) == 4 and len(case.questions) == 3
    assert case.questions[0].startswith("What is the official language of the country of citizenship")
    assert (case.answer, case.new_answer) == ("English", "Arabic")
    assert case.new_answer_aliases == ("ar", "Arabian language", "Arabic language")
    assert case.answer_aliases == ("en", "eng", "English language")
    assert case.single_hops[0] == MQuAKEHop(
        "Who performed Hey Jude?",
        "Hey Jude was performed by",
        "The Beatles",
        ("Beatles", "Fab Four", "John, Paul, George, and Ringo", "The Beattles", "The Lads from Liverpool"),
    )
    assert case.new_single_hops[1].answer == "Narendra Modi"
    e0, e1 = case.edits[0], case.edits[1]
    assert (e0.prompt, e0.subject, e0.target_new, e0.target_true) == (
        "{} was performed by",
        "Hey Jude",
        "Madonna",
        "The Beatles",
    )
    assert e0.case_id == "7417#0"
    assert e0.extra["question"] == "Who performed Hey Jude?"
    assert e0.extra["relation_id"] == "P175"
    assert e0.extra["target_aliases"] == [
        "Madonna Ciccone",
        "Madonna Louise Ciccone",
        "Madonna Louise Veronica Ciccone",
    ]
    assert e0.extra["target_true_aliases"][0] == "Beatles"
    assert (e1.subject, e1.target_new, e1.target_true) == ("Madonna", "Narendra Modi", "Guy Oseary")
    assert "orig" in case.extra and case.extra["orig"]["edit_triples_idx"] == [0, 1, 2, 3]
    probes = case.multi_hop_probes()
    assert len(probes) == 3 and {p.answer for p in probes} == {"Arabic"}
    assert case.multi_hop_probes(edited=False)[0].answer == "English"
    # load_requests flattens the cases to their edits
    reqs = load_requests(data_dir / "mquake/MQuAKE-hard_sample.json", limit=2)
    assert len(reqs) == 8 and reqs[4].case_id == f"{ds[1].case_id}#0"


# -- out of scope -------------------------------------------------------------------------------------------------
def test_tofu_jsonl_with_json_suffix_is_unsupported(data_dir):
    path = data_dir / "tofu/real_authors_perturbed.json"
    raw = read_records(path)  # JSON Lines despite the .json suffix
    assert isinstance(raw, list) and len(raw) == 100
    assert detect_format(raw) == "tofu"
    with pytest.raises(UnsupportedForEditingError, match="TOFU, an unlearning benchmark"):
        load_requests(path)
