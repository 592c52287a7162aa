"""The explicit state an editing session carries: statistics cache, corpus, context templates, seed.

kedit keeps no module-level caches. Everything the reference code caches in globals (covariances, context
templates, AlphaEdit's projector) lives on an :class:`EditContext` that the caller owns and may reuse across
calls -- e.g. for sequential editing, where the statistics of the *base* model are reused. State that depends on
which edits are applied does not live here: it travels with the deltas (AlphaEdit's edited keys are
``EditDelta.extras``, summed over :func:`kedit.deltas.applied_deltas`), so reverting an edit cannot leave it behind.

A context is **bound to one model** (:meth:`EditContext.model_key`): the first model it sees fixes the fingerprint
its statistics, templates and method caches are keyed by. It then accepts

* the same model object in any later state -- edited, reverted, edited again: statistics are those of the unedited
  model, as in the reference implementations (held through a weak reference: the context never keeps a model alive);
* another object whose weights are those the context was bound to -- a reloaded or copied model, now or after the
  deltas recorded in its rollback ledger (:mod:`kedit.deltas.ledger`) are taken off: its *pristine* fingerprint is
  compared;

and refuses any other model (:class:`ContextModelMismatchError`) -- before, a model of the same shape silently
reused the first model's covariances and null-space bases. Use a new context per model, or :meth:`EditContext.rebind`.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kedit.core.keys import sample_context_templates
from kedit.core.stats import SecondMoment, StatsCache
from kedit.fingerprint import model_fingerprint

__all__ = ["ContextModelMismatchError", "EditContext", "MissingCorpusError"]

log = logging.getLogger(__name__)


class MissingCorpusError(ValueError):
    """A method needs second-moment statistics but no text corpus is known for this model."""


class ContextModelMismatchError(ValueError):
    """An :class:`EditContext` bound to one model was used with a different one."""


Progress = Callable[[str, int, int], None]


def _model_name(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)


def pristine_fingerprint(model: nn.Module) -> str | None:
    """:func:`~kedit.fingerprint.model_fingerprint` of ``model`` as it was before the deltas applied to it (the
    base copies of its rollback ledger hashed in place of the touched parameters); ``None`` when no delta is applied
    (the pristine fingerprint is then the current one)."""
    from kedit.deltas.ledger import RollbackLedger
    from kedit.deltas.updates import get_param

    ledger = RollbackLedger.of(model)
    if ledger is None:
        return None
    canonical = {id(p): name for name, p in model.named_parameters()}
    overrides = {}
    for name, chain in ledger.chains.items():
        if chain:
            overrides[canonical.get(id(get_param(model, name)), name)] = chain[0].bases[name]
    return model_fingerprint(model, overrides=overrides)


class _Binding:
    """The model a context is bound to: its fingerprint (fixed) and the objects accepted for it (weak)."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.name: str = "?"
        self.models: weakref.WeakSet[nn.Module] = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"<bound to {self.name} {self.key[:12] if self.key else 'nothing'}>"


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
    _binding: _Binding = field(default_factory=_Binding, repr=False)
    _templates: dict[tuple, list[str]] = field(default_factory=dict, repr=False)

    # -- the model this context is bound to (statistics are those of its unedited state) ------------------------
    def model_key(self, model: nn.Module) -> str:
        """Fingerprint of the model this context is bound to (binding it to ``model`` on first use).

        Later states of the same object -- edited by any means -- reuse its statistics, as the reference
        implementations do; another object is accepted when its current or pristine weights (before the deltas in
        its rollback ledger) have the bound fingerprint. Any other model raises :class:`ContextModelMismatchError`.
        (``dataclasses.replace`` copies share the binding, as they share the statistics cache.)
        """
        b = self._binding
        if b.key is None:
            b.key = model_fingerprint(model)
            b.name = _model_name(model)
            b.models.add(model)
            return b.key
        if model in b.models:
            return b.key
        current = model_fingerprint(model)
        if current == b.key or pristine_fingerprint(model) == b.key:
            b.models.add(model)
            return b.key
        raise ContextModelMismatchError(
            f"this EditContext is bound to model {b.name!r} (weights fingerprint {b.key[:12]}), and its statistics, "
            f"context templates and method caches are that model's; it was now given a different model "
            f"{_model_name(model)!r} (fingerprint {current[:12]}, not an edited state of the bound one). "
            "Use a new EditContext for this model (a shared StatsCache keeps the statistics of both apart), or call "
            "ctx.rebind(model) to bind this context to it"
        )

    def rebind(self, model: nn.Module) -> None:
        """Bind this context to ``model`` (its current weights) from now on, dropping the method caches
        (:attr:`state`) and sampled templates of the previous model; the statistics cache is kept (it is keyed by
        model fingerprint). Other ``dataclasses.replace`` copies stay bound to the previous model."""
        self._binding = _Binding()
        self.state = {}
        self._templates = {}
        self.model_key(model)

    @property
    def bound_key(self) -> str | None:
        """Fingerprint of the bound model (``None`` before the first use)."""
        return self._binding.key

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
