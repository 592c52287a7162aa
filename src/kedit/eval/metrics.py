"""The metric registry: every number kedit reports, with its exact definition.

The field's reference framework reports several different quantities under one name (``rewrite_acc`` is a
teacher-forced *token* accuracy with partial credit, but "reliability" in papers is often exact match), so here
every metric has a unique name ``aspect/kind`` and a :class:`MetricDef` carrying its definition text and a
version; result files store both next to the value.

Two layers, both pure (no model, no I/O):

* **Primitive functions** on measured quantities -- :func:`token_accuracy`, :func:`exact_match`,
  :func:`normalize_answer`, :func:`token_agreement`, :func:`cf_success`, :func:`cf_magnitude`,
  :func:`ngram_entropy`, :func:`perplexity`. They are what the tests check on hand-computed cases.
* **Registered record metrics** ``fn(post: Observation, pre: Observation | None) -> float | None`` that reduce
  one record's probes (measured on the model after the edit, and before it) to one number; ``None`` means "not
  applicable to this record" (e.g. no portability probes) and is *excluded* from the mean, with the count of
  applicable records reported next to it.

Measured quantities (teacher-forced scores and greedy generations) come from :mod:`kedit.eval.scoring`.

Sources for the CounterFact definitions: Meng et al., "Locating and Editing Factual Associations in GPT"
(NeurIPS 2022), ``experiments/summarize.py`` of kmeng01/rome; fluency: the same paper's n-gram entropy
(``compute_n_gram_entropy``); EasyEdit's ``rewrite_acc``/``locality`` (Wang et al., "EasyEdit", ACL 2024 demo).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "HEADLINES",
    "METRICS",
    "MetricDef",
    "Observation",
    "ProbeResult",
    "TFScore",
    "cf_magnitude",
    "cf_success",
    "exact_match",
    "get_metric",
    "headline_metric",
    "list_metrics",
    "mean_nll",
    "metric_definitions",
    "ngram_entropy",
    "normalize_answer",
    "perplexity",
    "record_metrics",
    "register_metric",
    "sequence_correct",
    "token_accuracy",
    "token_agreement",
    "word_tokens",
]


# -- measured quantities --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TFScore:
    """Teacher-forced score of one answer after one prompt.

    Attributes:
        logprobs: ``log P(a_t | prompt ⊕ a_<t)`` for every answer token ``a_t`` (natural log).
        argmax: the model's most likely token at each of those positions.
        target: the answer's token ids ``a_t``.
    """

    logprobs: tuple[float, ...]
    argmax: tuple[int, ...]
    target: tuple[int, ...]

    @property
    def correct(self) -> tuple[bool, ...]:
        return tuple(a == t for a, t in zip(self.argmax, self.target))

    def to_dict(self) -> dict[str, Any]:
        return {"logprobs": list(self.logprobs), "argmax": list(self.argmax), "target": list(self.target)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TFScore:
        return cls(tuple(d["logprobs"]), tuple(d["argmax"]), tuple(d["target"]))


@dataclass(frozen=True)
class ProbeResult:
    """Everything measured for one probe prompt in one model state.

    Attributes:
        prompt: the prompt text.
        answers: acceptable answers (first = the canonical one used for teacher forcing), possibly empty.
        generation: greedy continuation (``max_new_tokens`` tokens, decoded without special tokens).
        tf: teacher-forced score of ``answers[0]`` (``None`` when there is no answer).
        tf_new: teacher-forced score of the request's ``target_new`` after this prompt (CounterFact NS, ES, PS).
        tf_true: teacher-forced score of the request's ``target_true`` (CounterFact ES/PS), if known.
    """

    prompt: str
    answers: tuple[str, ...] = ()
    generation: str = ""
    tf: TFScore | None = None
    tf_new: TFScore | None = None
    tf_true: TFScore | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "answers": list(self.answers),
            "generation": self.generation,
            "tf": None if self.tf is None else self.tf.to_dict(),
            "tf_new": None if self.tf_new is None else self.tf_new.to_dict(),
            "tf_true": None if self.tf_true is None else self.tf_true.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProbeResult:
        def tf(x: Any) -> TFScore | None:
            return None if x is None else TFScore.from_dict(x)

        return cls(d["prompt"], tuple(d["answers"]), d["generation"], tf(d["tf"]), tf(d["tf_new"]), tf(d["tf_true"]))


#: probe groups of a record, in the order they are measured
GROUPS = ("rewrite", "paraphrase", "alias", "neighborhood", "portability")


@dataclass(frozen=True)
class Observation:
    """All probes of one record measured in one model state, plus the fluency generations.

    ``groups["rewrite"]`` is the edit prompt itself; ``paraphrase`` the paraphrases; ``alias`` the edit prompt with
    each subject alias; ``neighborhood`` the locality probes; ``portability`` the portability probes.
    """

    groups: dict[str, tuple[ProbeResult, ...]]
    fluency: tuple[str, ...] = ()
    perplexity: float | None = None

    def group(self, name: str) -> tuple[ProbeResult, ...]:
        return self.groups.get(name, ())

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups": {k: [p.to_dict() for p in v] for k, v in self.groups.items()},
            "fluency": list(self.fluency),
            "perplexity": self.perplexity,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Observation:
        return cls(
            {k: tuple(ProbeResult.from_dict(p) for p in v) for k, v in d["groups"].items()},
            tuple(d.get("fluency", ())),
            d.get("perplexity"),
        )


# -- primitive metric functions ------------------------------------------------------------------------------------
def token_accuracy(correct: Sequence[bool]) -> float:
    """Teacher-forced token accuracy with **partial credit**: the fraction of answer tokens that are the argmax
    given the prompt and the *true* previous answer tokens. ``[True, True, False]`` → 2/3. (EasyEdit's
    ``rewrite_acc``/``rephrase_acc``/``portability``.)"""
    if len(correct) == 0:
        raise ValueError("token_accuracy of an empty answer")
    return sum(bool(c) for c in correct) / len(correct)


def sequence_correct(correct: Sequence[bool]) -> float:
    """1.0 if every answer token is the teacher-forced argmax, else 0.0 (no partial credit)."""
    if len(correct) == 0:
        raise ValueError("sequence_correct of an empty answer")
    return float(all(correct))


def mean_nll(logprobs: Sequence[float]) -> float:
    """Mean negative log-likelihood per answer token, ``-(1/|a|) Σ_t log P(a_t | ·)`` (ROME's per-token NLL)."""
    if len(logprobs) == 0:
        raise ValueError("mean_nll of an empty answer")
    return -sum(logprobs) / len(logprobs)


_PUNCT = re.compile(r"[^\w\s]", flags=re.UNICODE)


def normalize_answer(text: str) -> str:
    """Normalisation for exact match: Unicode NFKC, case-folded, punctuation replaced by spaces (so ``"U.S."``
    and ``"U S"`` agree), whitespace collapsed and stripped. Articles are kept (removing them would let
    ``"The Hague"`` match ``"Hague"``)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _PUNCT.sub(" ", text)
    return " ".join(text.split())


def exact_match(generation: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised greedy generation **starts with** a normalised acceptable answer on a word boundary
    (the generation may continue after the answer: ``"Paris, the capital"`` matches ``"Paris"``, ``"Parisian"``
    does not), for any answer in ``answers`` (the canonical answer and its aliases); else 0.0."""
    gen = normalize_answer(generation)
    for ans in answers:
        a = normalize_answer(ans)
        if a and (gen == a or gen.startswith(a + " ")):
            return 1.0
    return 0.0


def token_agreement(pre_argmax: Sequence[int], post_argmax: Sequence[int]) -> float:
    """Fraction of teacher-forced positions whose argmax token is the same before and after the edit (EasyEdit's
    ``locality``; partial credit)."""
    if len(pre_argmax) != len(post_argmax) or len(pre_argmax) == 0:
        raise ValueError("token_agreement needs two non-empty argmax sequences of equal length")
    return sum(a == b for a, b in zip(pre_argmax, post_argmax)) / len(pre_argmax)


def cf_success(nll_preferred: float, nll_other: float) -> float:
    """CounterFact's discrete score: 1.0 if the preferred answer is more probable, i.e. has the lower mean
    per-token NLL (``P = exp(-mean NLL)``, the geometric-mean token probability), else 0.0. Ties count as 0."""
    return float(nll_preferred < nll_other)


def cf_magnitude(nll_preferred: float, nll_other: float) -> float:
    """CounterFact's magnitude: ``exp(-nll_preferred) - exp(-nll_other)`` (difference of geometric-mean token
    probabilities; ROME's ``*_diff``)."""
    return math.exp(-nll_preferred) - math.exp(-nll_other)


_WORD = re.compile(r"\w+|[^\w\s]", flags=re.UNICODE)


def word_tokens(text: str) -> list[str]:
    """Word tokens for n-gram statistics: runs of word characters and single punctuation marks (a dependency-free
    stand-in for ``nltk.word_tokenize``; it differs from it on contractions such as ``"don't"``)."""
    return _WORD.findall(text)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's fluency score of one text: for each n in ``ns``, the entropy in **bits** of the frequency
    distribution of its word n-grams, ``H_n = -Σ_g f_g log2 f_g``; the result is the arithmetic mean of
    ``w_n · H_n`` (weights 2/3 for bigrams and 4/3 for trigrams, so it equals ``(2/3·H2 + 4/3·H3)/2``).
    A text with fewer than n words contributes ``H_n = 0``. Repetitive (degenerate) text scores low."""
    if len(ns) != len(weights):
        raise ValueError("ns and weights must have the same length")
    toks = word_tokens(text)
    total = 0.0
    for n, w in zip(ns, weights):
        grams = Counter(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))
        count = sum(grams.values())
        h = -sum((c / count) * math.log2(c / count) for c in grams.values()) if count else 0.0
        total += w * h
    return total / len(ns)


def perplexity(total_nll: float, n_tokens: int) -> float:
    """``exp(Σ NLL / N)`` over all predicted tokens of a text set (token-weighted, not a mean of per-text
    perplexities)."""
    if n_tokens <= 0:
        raise ValueError("perplexity over zero tokens")
    return math.exp(total_nll / n_tokens)


# -- the registry --------------------------------------------------------------------------------------------------
RecordFn = Callable[["Observation", "Observation | None"], "float | None"]


@dataclass(frozen=True)
class MetricDef:
    """One registered metric.

    Attributes:
        name: ``aspect/kind`` (unique), e.g. ``reliability/exact_match``.
        aspect: reliability, generalization, alias, locality, portability, fluency, capability.
        definition: the exact definition, stored in every result file next to the value.
        fn: ``fn(post, pre) -> float | None`` for one record.
        version: bumped whenever the definition changes.
        partial_credit: the per-probe value can lie strictly between 0 and 1 (token-level credit).
        needs_pre: the metric compares with the pre-edit model (its pre-edit value is not meaningful).
        higher_is_better: direction, for reports.
        easyedit: the EasyEdit result key this corresponds to, if any.
    """

    name: str
    aspect: str
    definition: str
    fn: RecordFn = field(repr=False, compare=False)
    version: int = 1
    partial_credit: bool = False
    needs_pre: bool = False
    higher_is_better: bool = True
    easyedit: str | None = None

    @property
    def id(self) -> str:
        return f"{self.name}@v{self.version}"

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "id": self.id,
            "aspect": self.aspect,
            "definition": self.definition,
            "partial_credit": self.partial_credit,
            "needs_pre": self.needs_pre,
            "higher_is_better": self.higher_is_better,
            "easyedit": self.easyedit,
        }


METRICS: dict[str, MetricDef] = {}


#: which neighbourhood probes every locality metric sees (the runner selects them; see kedit.eval.runner)
LOCALITY_PROBES = (" Neighbourhood probes that name a subject edited in the evaluated model state are excluded "
                   "(locality rule 2).")


def register_metric(name: str, *, definition: str, **kw: Any) -> Callable[[RecordFn], RecordFn]:
    """Decorator registering ``fn(post, pre) -> float | None`` under ``name`` (``aspect/kind``)."""

    def deco(fn: RecordFn) -> RecordFn:
        if name in METRICS:
            raise ValueError(f"metric {name!r} is already registered")
        aspect = name.split("/", 1)[0]
        text = definition + (LOCALITY_PROBES if aspect == "locality" else "")
        METRICS[name] = MetricDef(name=name, aspect=aspect, definition=" ".join(text.split()), fn=fn, **kw)
        return fn

    return deco


def get_metric(name: str) -> MetricDef:
    try:
        return METRICS[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; known: {sorted(METRICS)}") from None


def list_metrics() -> list[MetricDef]:
    return list(METRICS.values())


def metric_definitions() -> dict[str, dict[str, Any]]:
    """``{name: MetricDef.describe()}`` for every registered metric (what result files store)."""
    return {m.name: m.describe() for m in METRICS.values()}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _probe_mean(probes: Sequence[ProbeResult], fn: Callable[[ProbeResult], float | None]) -> float | None:
    """Mean of ``fn`` over the probes where it applies: each probe weighs equally within its record."""
    return _mean([v for v in (fn(p) for p in probes) if v is not None])


def _tf_acc(p: ProbeResult) -> float | None:
    return None if p.tf is None else token_accuracy(p.tf.correct)


def _em(p: ProbeResult) -> float | None:
    return exact_match(p.generation, p.answers) if p.answers else None


def _cf_new_over_true(p: ProbeResult, magnitude: bool) -> float | None:
    if p.tf_new is None or p.tf_true is None:
        return None
    a, b = mean_nll(p.tf_new.logprobs), mean_nll(p.tf_true.logprobs)
    return cf_magnitude(a, b) if magnitude else cf_success(a, b)


def _cf_true_over_new(p: ProbeResult, magnitude: bool) -> float | None:
    if p.tf_new is None or p.tf is None or not p.answers:
        return None
    a, b = mean_nll(p.tf.logprobs), mean_nll(p.tf_new.logprobs)
    return cf_magnitude(a, b) if magnitude else cf_success(a, b)


_TF = ("teacher-forced token accuracy WITH PARTIAL CREDIT: ids = tok(prompt) ⊕ tok(' ' + answer, no special "
       "tokens); per probe, the fraction of answer tokens that are the argmax of the next-token distribution given "
       "the prompt and the true previous answer tokens; mean over the record's {what}, then over records.")
_EM = ("exact match of the greedy continuation (max(max_new_tokens, longest answer of the record in tokens + 2) tokens, decoded without special tokens): 1 if the "
       "normalised continuation (NFKC, casefold, punctuation→space, whitespace collapsed) starts with a normalised "
       "acceptable answer ({answers}) on a word boundary, else 0; mean over the record's {what}, then over records.")
_CF = ("CounterFact {score}: per probe 1[P({a}) > P({b})] with P = exp(-mean per-token NLL) under teacher forcing "
       "(kmeng01/rome summarize.py); mean over the record's {what}, then over records.")
_CFM = ("CounterFact {score} magnitude: per probe P({a}) - P({b}) with P = exp(-mean per-token NLL) under teacher "
        "forcing; mean over the record's {what}, then over records.")


def _register_edit_aspect(aspect: str, group: str, what: str, easyedit: str | None, cf_score: str | None) -> None:
    register_metric(f"{aspect}/exact_match", definition=_EM.format(answers="target_new and its aliases", what=what),
                    version=2)(
        lambda post, pre, g=group: _probe_mean(post.group(g), _em)
    )
    register_metric(f"{aspect}/token_acc", definition=_TF.format(what=what), partial_credit=True, easyedit=easyedit)(
        lambda post, pre, g=group: _probe_mean(post.group(g), _tf_acc)
    )
    if cf_score is not None:
        register_metric(
            f"{aspect}/cf_score",
            definition=_CF.format(score=cf_score, a="target_new", b="target_true", what=what),
        )(lambda post, pre, g=group: _probe_mean(post.group(g), lambda p: _cf_new_over_true(p, False)))
        register_metric(
            f"{aspect}/cf_magnitude",
            definition=_CFM.format(score=cf_score, a="target_new", b="target_true", what=what),
        )(lambda post, pre, g=group: _probe_mean(post.group(g), lambda p: _cf_new_over_true(p, True)))


_register_edit_aspect("reliability", "rewrite", "edit prompt", "rewrite_acc", "efficacy score (ES)")
_register_edit_aspect("generalization", "paraphrase", "paraphrases", "rephrase_acc", "paraphrase score (PS)")
_register_edit_aspect("alias", "alias", "edit prompts with each subject alias", None, None)


@register_metric(
    "portability/exact_match",
    version=2,
    definition=_EM.format(answers="the probe's answer and its aliases", what="portability probes that have an "
                          "answer"),
)
def _portability_em(post: Observation, pre: Observation | None) -> float | None:
    return _probe_mean(post.group("portability"), _em)


@register_metric(
    "portability/token_acc",
    definition=_TF.format(what="portability probes that have an answer"),
    partial_credit=True,
    easyedit="portability",
)
def _portability_tf(post: Observation, pre: Observation | None) -> float | None:
    return _probe_mean(post.group("portability"), _tf_acc)


def _pairs(post: Observation, pre: Observation | None, group: str) -> list[tuple[ProbeResult, ProbeResult]]:
    if pre is None:
        return []
    a, b = pre.group(group), post.group(group)
    if len(a) != len(b):
        raise ValueError(f"pre- and post-edit observations have different numbers of {group} probes")
    return list(zip(a, b))


@register_metric(
    "locality/unchanged",
    version=2,
    definition="unchanged from the pre-edit model: per neighbourhood probe, 1 if the post-edit greedy continuation "
    "(same length as for exact match, whitespace-collapsed) is identical to the pre-edit one, else 0; mean over the record's "
    "neighbourhood probes, then over records.",
    needs_pre=True,
)
def _locality_unchanged(post: Observation, pre: Observation | None) -> float | None:
    pairs = _pairs(post, pre, "neighborhood")
    return _mean([float(" ".join(a.generation.split()) == " ".join(b.generation.split())) for a, b in pairs])


@register_metric(
    "locality/unchanged_tf",
    version=2,
    definition="unchanged from the pre-edit model, teacher-forced WITH PARTIAL CREDIT (EasyEdit's locality): per "
    "neighbourhood probe, on prompt ⊕ answer (the probe's answer, or the pre-edit greedy continuation when it has "
    "none), the fraction of answer positions whose argmax token is the same after the edit as before; mean over "
    "the record's neighbourhood probes, then over records.",
    needs_pre=True,
    partial_credit=True,
    easyedit="locality",
)
def _locality_unchanged_tf(post: Observation, pre: Observation | None) -> float | None:
    vals = [
        token_agreement(a.tf.argmax, b.tf.argmax)
        for a, b in _pairs(post, pre, "neighborhood")
        if a.tf is not None and b.tf is not None
    ]
    return _mean(vals)


@register_metric(
    "locality/still_correct",
    version=2,
    definition=_EM.format(answers="the probe's known answer and its aliases", what="neighbourhood probes that have "
                          "a known answer"),
)
def _locality_correct(post: Observation, pre: Observation | None) -> float | None:
    return _probe_mean([p for p in post.group("neighborhood") if p.answers], _em)


@register_metric(
    "locality/still_correct_tf",
    version=2,
    definition=_TF.format(what="neighbourhood probes that have a known answer"),
    partial_credit=True,
)
def _locality_correct_tf(post: Observation, pre: Observation | None) -> float | None:
    return _probe_mean([p for p in post.group("neighborhood") if p.answers], _tf_acc)


@register_metric(
    "locality/cf_score",
    version=2,
    definition=_CF.format(score="neighbourhood score (NS)", a="the probe's known answer",
                          b="target_new", what="neighbourhood probes that have a known answer"),
)
def _locality_ns(post: Observation, pre: Observation | None) -> float | None:
    return _probe_mean(post.group("neighborhood"), lambda p: _cf_true_over_new(p, False))


@register_metric(
    "locality/cf_magnitude",
    version=2,
    definition=_CFM.format(score="neighbourhood score (NS)", a="the probe's known answer",
                           b="target_new", what="neighbourhood probes that have a known answer"),
)
def _locality_nm(post: Observation, pre: Observation | None) -> float | None:
    return _probe_mean(post.group("neighborhood"), lambda p: _cf_true_over_new(p, True))


@register_metric(
    "fluency/ngram_entropy",
    definition="ROME's generation entropy: per greedy generation of exactly fluency_tokens tokens (end-of-text "
    "suppressed until then, as ROME generates a fixed length) from the record's generation prompts (CounterFact "
    "generation_prompts, else the edit prompt), (2/3·H2 + 4/3·H3)/2 where H_n is the entropy in bits of the word "
    "n-gram frequency distribution (words = regex \\w+|[^\\w\\s]); mean over the record's generations, then over "
    "records. Greedy decoding (ROME samples top-k 5).",
    version=2,
)
def _fluency(post: Observation, pre: Observation | None) -> float | None:
    return _mean([ngram_entropy(t) for t in post.fluency])


@register_metric(
    "capability/perplexity",
    definition="perplexity exp(Σ NLL / N) of the model on a fixed set of general texts (the testbed's filler "
    "sentences by default), token-weighted, measured at the evaluation point of the record (after its edit step); "
    "lower is better.",
    higher_is_better=False,
)
def _perplexity(post: Observation, pre: Observation | None) -> float | None:
    return post.perplexity


#: headline metric of each aspect of the summary, per headline style
HEADLINES: dict[str, dict[str, str]] = {
    "exact_match": {
        "reliability": "reliability/exact_match",
        "generalization": "generalization/exact_match",
        "locality": "locality/unchanged",
        "portability": "portability/exact_match",
        "fluency": "fluency/ngram_entropy",
    },
    "token_acc": {
        "reliability": "reliability/token_acc",
        "generalization": "generalization/token_acc",
        "locality": "locality/unchanged_tf",
        "portability": "portability/token_acc",
        "fluency": "fluency/ngram_entropy",
    },
    "counterfact": {
        "reliability": "reliability/cf_score",
        "generalization": "generalization/cf_score",
        "locality": "locality/cf_score",
        "portability": "portability/exact_match",
        "fluency": "fluency/ngram_entropy",
    },
}


def headline_metric(style: str, aspect: str) -> str:
    if style not in HEADLINES:
        raise ValueError(f"unknown headline style {style!r}; known: {sorted(HEADLINES)}")
    return HEADLINES[style][aspect]


def record_metrics(post: Observation, pre: Observation | None) -> dict[str, float | None]:
    """Every registered metric of one record."""
    return {m.name: m.fn(post, pre) for m in METRICS.values()}
