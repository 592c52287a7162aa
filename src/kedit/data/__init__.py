"""Loaders for real-format knowledge-editing datasets.

>>> from kedit.data import load_requests, load_dataset
>>> requests = load_requests("counterfact.json")                  # format detected from the records
>>> cases = load_dataset("MQuAKE-CF-3k.json", format="mquake")     # MQuAKECase records
>>> good, problems = load_requests("zsre_subject_replace.json", errors="collect")

Formats (:data:`FORMATS`): ``counterfact`` (ROME/MEMIT ``requested_rewrite``), ``easyedit`` (flat),
``zsre``, ``knowedit`` (ZsRE-test-all / wiki_counterfact / wiki_recent / WikiBio), ``knowedit_sanitation``,
``knowedit_convsent`` (topics, not edits), ``mquake``, ``kedit`` (``EditRequest.to_dict()`` objects).
TOFU, KnowUnDo, KETI and OneEdit are recognised and refused with :class:`UnsupportedForEditingError`.
Field mappings and quirks: ``docs/data.md``.
"""

from .api import dump_requests, load_dataset, load_requests, parse_records, read_records
from .detect import FORMATS, FormatInfo, classify_record, detect_format
from .errors import DataFormatError, RecordProblem, UnsupportedForEditingError
from .records import LoadedDataset, MQuAKECase, MQuAKEHop, SentimentTopic, sentiment_requests
from .select import distinct_per_batch, distinct_subjects, subject_conflicts, subject_key, whole_subjects

__all__ = [
    "FORMATS",
    "DataFormatError",
    "FormatInfo",
    "LoadedDataset",
    "MQuAKECase",
    "MQuAKEHop",
    "RecordProblem",
    "SentimentTopic",
    "UnsupportedForEditingError",
    "classify_record",
    "detect_format",
    "distinct_per_batch",
    "distinct_subjects",
    "dump_requests",
    "load_dataset",
    "load_requests",
    "parse_records",
    "read_records",
    "sentiment_requests",
    "subject_conflicts",
    "subject_key",
    "whole_subjects",
]
