"""Every file of the shared real-format samples (/work/shared/data, or $KEDIT_SHARED_DATA): detected format,
record counts matching MANIFEST.json, and concrete field values for the files not copied into tests/data/.

Skipped when the shared folder is absent (the copies in tests/data/ are covered by test_data_formats.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kedit.data import UnsupportedForEditingError, load_dataset, load_requests
from kedit.requests import Probe

SHARED = Path(os.environ.get("KEDIT_SHARED_DATA", "/work/shared/data"))
pytestmark = pytest.mark.skipif(
    not (SHARED / "MANIFEST.json").is_file(), reason="shared samples not available"
)

# file -> (format, records loaded, records rejected in collect mode); format None = refused as not editing data
EXPECTED = {
    "counterfact/DERIVED_rome_fields_only/counterfact_rome_fields_sample.json": ("counterfact", 150, 0),
    "counterfact/easyedit/counterfact-edit_sample.json": ("easyedit", 300, 0),
    "counterfact/easyedit/counterfact-train_sample.json": ("easyedit", 300, 0),
    "counterfact/easyedit/counterfact-val_sample.json": ("easyedit", 300, 0),
    "counterfact/easyedit/counterfact_distracting_neighbor_sample.json": ("counterfact", 100, 0),
    "counterfact/easyedit/counterfact_portability_gpt4_sample.json": ("counterfact", 150, 0),
    "counterfact/easyedit/counterfact_subject_replace_sample.json": ("counterfact", 100, 0),
    "zsre/zsre_mend_train-1k_sample.json": ("zsre", 300, 0),
    "zsre/zsre_mend_eval_portability_gpt4_sample.json": ("zsre", 300, 0),
    "zsre/zsre_inverse_relation_sample.json": ("zsre", 199, 1),
    "zsre/zsre_subject_replace_sample.json": ("zsre", 198, 2),
    "knowedit/ZsRE/ZsRE-test-all_sample.json": ("knowedit", 300, 0),
    "knowedit/ZsRE_ccks2024_copy/ZsRE-test-all_sample.json": ("knowedit", 100, 0),
    "knowedit/wiki_counterfact/train_cf_sample.json": ("knowedit", 300, 0),
    "knowedit/wiki_recent/recent_train_sample.json": ("knowedit", 200, 0),
    "knowedit/WikiBio/wikibio-test-all_sample.json": ("knowedit", 150, 0),
    "knowedit/Sanitation/trivia_qa_test.json": ("knowedit_sanitation", 80, 0),
    "knowedit/Convsent/blender_test_sample.json": ("knowedit_convsent", 100, 0),
    "mquake/MQuAKE-hard_sample.json": ("mquake", 150, 0),
}
UNSUPPORTED_PREFIXES = ("tofu/", "knowundo/", "keti/", "oneedit/")


def _manifest() -> dict[str, dict]:
    return {e["dest"]: e for e in json.loads((SHARED / "MANIFEST.json").read_text())}


def test_every_shared_file_is_classified():
    files = sorted(
        str(p.relative_to(SHARED))
        for p in SHARED.rglob("*")
        if p.is_file() and p.name not in ("MANIFEST.json", "README.md", "SOURCES.md")
    )
    assert files, "no sample files found"
    for rel in files:
        assert rel in EXPECTED or rel.startswith(UNSUPPORTED_PREFIXES), f"unclassified sample {rel}"


@pytest.mark.parametrize("rel", sorted(EXPECTED))
def test_shared_editing_file(rel):
    fmt, n_ok, n_bad = EXPECTED[rel]
    ds = load_dataset(SHARED / rel, errors="collect")
    assert ds.format == fmt
    assert (len(ds), len(ds.problems)) == (n_ok, n_bad)
    kept = _manifest()[rel]["kept"]
    if kept != "all":
        assert ds.n_source_records == kept
    if fmt != "knowedit_convsent":
        assert len(ds.requests()) >= n_ok


def test_shared_unsupported_files():
    for path in sorted(SHARED.rglob("*")):
        rel = str(path.relative_to(SHARED))
        if path.is_file() and rel.startswith(UNSUPPORTED_PREFIXES):
            with pytest.raises(UnsupportedForEditingError):
                load_requests(path)


def test_convsent_topics():
    ds = load_dataset(SHARED / "knowedit/Convsent/blender_test_sample.json")
    assert ds[0].topic == "Estero"
    assert ds[0].positive[0] == "I really like his style."
    assert len(ds[0].positive) == 11 and len(ds[0].negative) == 9
    with pytest.raises(UnsupportedForEditingError):
        load_requests(SHARED / "knowedit/Convsent/blender_test_sample.json")


def test_wiki_recent_nested_answers():
    r = load_requests(SHARED / "knowedit/wiki_recent/recent_train_sample.json", limit=1)[0]
    assert (r.prompt, r.subject, r.target_new, r.target_true) == (
        "The gender of {} is",
        "Ingr\u012bda Amantova",
        "female",
        None,
    )
    assert r.neighborhood[1] == Probe(
        "The name of the country of citizenship of Ingr\u012bda Amantova is",
        "Soviet Union",
        "Relation_Specificity",
    )
    assert r.extra["neighborhood_answers"][1][:3] == ["Soviet Union", "USSR", "U.S.S.R."]
    assert len(r.extra["neighborhood_answers"]) == len(r.neighborhood) == 5


def test_wiki_counterfact_record():
    r = load_requests(SHARED / "knowedit/wiki_counterfact/train_cf_sample.json", limit=1)[0]
    assert (r.subject, r.target_new, r.target_true) == ("Goursez Vreizh", "Franche-Comt\u00e9", "France")
    assert r.portability == (
        Probe(
            "The name of the capital city of the country Goursez Vreizh is associated with is",
            "Besan\u00e7on",
            "Reasoning",
        ),
        Probe(
            "The name of the country which Gorsedd of Brittany is associated with is",
            "Franche-Comt\u00e9",
            "Subject_Aliasing",
        ),
    )
    assert r.neighborhood == (
        Probe("The name of the founder of Goursez Vreizh is", "Jean Le Fustec", "Relation_Specificity"),
    )


def test_distracting_neighbour_and_portability():
    r = load_requests(SHARED / "counterfact/easyedit/counterfact_distracting_neighbor_sample.json", limit=1)[
        0
    ]
    assert (r.subject, r.target_new, r.target_true) == ("Spike Hughes", "Philadelphia", "London")
    kinds = [p.kind for p in r.neighborhood]
    assert kinds == ["neighborhood"] * 10 + ["distracting_neighborhood"] * 10 + ["unrelated_relation"]
    assert r.neighborhood[10] == Probe(
        "Spike Hughes originates from Philadelphia. Max Mosley originates from",
        "London",
        "distracting_neighborhood",
    )
    assert r.neighborhood[-1] == Probe("What is Spike Hughes an instance of?", "human", "unrelated_relation")
    assert r.portability == (
        Probe(
            "What famous food is associated with the city where Spike Hughes originates from?",
            "Cheesesteaks",
            "one_hop",
        ),
    )
    assert r.extra["recalled_relation"] == "(Philadelphia, known for, cheesesteaks)"
    derived = load_requests(
        SHARED / "counterfact/DERIVED_rome_fields_only/counterfact_rome_fields_sample.json", limit=1
    )[0]
    assert derived.portability == () and derived.neighborhood == r.neighborhood[:10]


def test_zsre_eval_portability():
    r = load_requests(SHARED / "zsre/zsre_mend_eval_portability_gpt4_sample.json", limit=1)[0]
    assert (r.subject, r.target_new, r.target_true) == ("IAAF Combined Events Challenge", "2006", "1998")
    assert r.extra["pred"] == "2011"
    assert r.portability == (
        Probe(
            "What type of sports event is the IAAF Combined Events Challenge, which was established in 2006?",
            "Athletics",
            "one_hop",
        ),
    )
    assert r.neighborhood[0].prompt == "nq question: what is the name of the last episode of spongebob"
