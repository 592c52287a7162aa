"""The explicit state an editing session carries: statistics cache, corpus, context templates, seed.

kedit keeps no module-level caches. Everything the reference code caches in globals (covariances, context
templates, AlphaEdit's projector) lives on an :class:`EditContext` that the caller owns and may reuse across
calls -- e.g. for sequential editing, where the statistics of the *base* model are reused. State that depends on
which edits are applied does not live here: it travels with the deltas (AlphaEdit's edited keys are
``EditDelta.extras``, summed over :func:`kedit.deltas.applied_deltas`), so reverting an edit cannot leave it behind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kedit.core.keys import sample_context_templates
from kedit.core.stats import SecondMoment, StatsCache
from kedit.fingerprint import model_fingerprint

__all__ = ["EditContext", "MissingCorpusError"]

log = logging.getLogger(__name__)


class MissingCorpusError(ValueError):
    """A method needs second-moment statistics but no text corpus is known for this model."""


Progress = Callable[[str, int, int], None]


@dataclass
class EditContext:
    """State shared by the calls of one editing session.

    Attributes:
        stats: the covariance cache (in memory by default; give it a directory to persist across runs).
        corpus: texts for the statistics (a sequence, or a zero-argument callable returning an iterable).
            ``None``: the testbed corpus for testbed models; other models need one (see :meth:`texts_for`).
        corpus_id: a stable name for the corpus (used in cache keys instead of hashing the texts).
        seed: seed of the sampled context templates and any other randomness.
        templates: injected context templates (``["{}", "prefix. {}", ...]``) replacing the sampled ones.
        state: method-specific caches kept across calls (e.g. AlphaEdit's projector and its memo of the applied
            deltas' key moments).
        progress: ``fn(stage, done, total)`` called on long stages (the CLI draws progress bars from it).
    """

    stats: StatsCache = field(default_factory=StatsCache)
    corpus: Sequence[str] | Callable[[], Iterable[str]] | None = None
    corpus_id: str | None = None
    seed: int = 0
    templates: Sequence[str] | None = None
    state: dict[str, Any] = field(default_factory=dict)
    progress: Progress | None = None
    _model_key: str | None = field(default=None, repr=False)
    _templates: dict[tuple, list[str]] = field(default_factory=dict, repr=False)

    # -- identity of the base model (statistics are those of the model first seen) ------------------------------
    def model_key(self, model: nn.Module) -> str:
        """Fingerprint of the first model this context saw: later (edited) states reuse its statistics,
        as the reference implementations do."""
        if self._model_key is None:
            self._model_key = model_fingerprint(model)
        return self._model_key

    def report(self, stage: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(stage, done, total)

    # -- corpus ------------------------------------------------------------------------------------------------
    def texts_for(self, model: nn.Module) -> tuple[Iterable[str], str | None]:
        if self.corpus is not None:
            texts = self.corpus() if callable(self.corpus) else self.corpus
            return texts, self.corpus_id
        from kedit.testbed import corpus_for_model

        found = corpus_for_model(model)
        if found is not None:
            return found
        name = getattr(getattr(model, "config", None), "_name_or_path", "?")
        raise MissingCorpusError(
            f"this method needs second-moment statistics, but no corpus is known for model {name!r}. "
            "Pass EditContext(corpus=texts) with a few thousand representative texts (e.g. Wikipedia), "
            "or set mom2_adjustment=False where the method allows it."
        )

    def second_moments(
        self, model: nn.Module, tok, layers: Sequence[int], *, n_tokens: int, dtype: torch.dtype = torch.float64
    ) -> dict[int, SecondMoment]:
        texts, corpus_id = self.texts_for(model)
        return self.stats.get(
            model,
            tok,
            list(layers),
            texts,
            n_tokens=n_tokens,
            corpus_id=corpus_id,
            dtype=dtype,
            model_key=self.model_key(model),
            progress=lambda d, t: self.report("statistics", d, t),
        )

    # -- context templates -------------------------------------------------------------------------------------
    def context_templates(self, model: nn.Module, tok, lengths: Sequence[tuple[int, int]]) -> list[str]:
        """Injected templates if given, else sampled once per (model, lengths) and kept on this context."""
        if self.templates is not None:
            return list(self.templates)
        key = (self.model_key(model), tuple(tuple(x) for x in lengths), self.seed)
        if key not in self._templates:
            self._templates[key] = sample_context_templates(model, tok, lengths=lengths, seed=self.seed)
        return list(self._templates[key])

    @classmethod
    def with_cache_dir(cls, directory: str | Path, **kw: Any) -> EditContext:
        return cls(stats=StatsCache(directory), **kw)

    @classmethod
    def with_default_cache(cls, **kw: Any) -> EditContext:
        """A context whose statistics persist in kedit's default cache (:func:`kedit.core.stats.default_stats_dir`:
        ``$KEDIT_CACHE``, else ``$XDG_CACHE_HOME/kedit``, else ``~/.cache/kedit``), as the command line uses."""
        from kedit.core.stats import default_stats_dir

        return cls.with_cache_dir(default_stats_dir(), **kw)
