"""One-pass second-moment statistics of MLP keys, and an explicit cache for them.

ROME/MEMIT/AlphaEdit need ``C = E[k kᵀ]`` (uncentred) of the key ``k`` -- the *input* of each edited layer's MLP
output projection (slot ``mlp_out``) -- over a generic corpus. :func:`collect_second_moments` gathers it for all
requested layers in **one** forward pass per batch (hooks on every layer at once, the forward stopped right after
the deepest requested layer), over every non-pad token, accumulated in fp64 by default, stopping at exactly
``n_tokens`` tokens.

:class:`StatsCache` is an explicit cache object (no globals): it returns cached layers and computes only the missing
ones, in one pass. Entries are keyed by (model key, layer and module path, corpus hash, n_tokens, dtype, max_length,
tokenizer hash) and stored in memory and, if a directory is given, as ``<key-hash>.safetensors`` files whose
metadata is validated on read. Files are written to a temporary name and renamed into place, so concurrent runs
sharing a directory never read half a file (at worst both compute the same entry, and one rename wins).

The tokenizer hash covers what decides the token ids -- vocabulary, merges, normaliser, pre-tokeniser, added and
special tokens -- but not the truncation and padding settings a fast tokenizer's backend carries: calling the
tokenizer with ``truncation=True`` (as the statistics pass does) changes those, and must not change the key.

The command line keeps statistics in a persistent default cache, :func:`default_stats_dir` (``$KEDIT_CACHE``, else
``$XDG_CACHE_HOME/kedit``, else ``~/.cache/kedit``, then ``stats/``), the way Hugging Face caches downloads; the
Python API stays in memory unless given a directory (:meth:`kedit.core.context.EditContext.with_default_cache`).

Corpus hashing
--------------
A corpus may be a huge (streamed) iterable. Only a prefix is used: texts are consumed in order until ``n_tokens``
tokens are counted (each text truncated to ``max_length`` tokens), and the statistics depend on that prefix only.
Without a ``corpus_id``, :meth:`StatsCache.get` therefore tokenizes the prefix first (no forward pass), hashes
exactly the consumed texts, looks the key up, and only then runs the model on the already tokenized prefix -- so a
cache hit costs one tokenization of the prefix, nothing is hashed twice, and a longer iterable with the same prefix
hits the same entry. The prefix is held in memory as int32 token ids (4 bytes per token). With an explicit
``corpus_id`` (e.g. ``"wikitext-103@v1"``) nothing is tokenized on a hit and texts are streamed on a miss; you then
vouch that the id names a fixed text sequence.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kedit.arch import ArchAdapter, get_adapter
from kedit.core.batching import device_of, pad_batch
from kedit.core.batching import pad_id as _pad_id  # a local `pad_id` holds the value
from kedit.fingerprint import model_fingerprint
from kedit.hooks import trace

__all__ = [
    "SecondMoment",
    "StatsCache",
    "collect_second_moments",
    "corpus_hash",
    "default_cache_dir",
    "default_max_length",
    "default_stats_dir",
]

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]

_CACHE_FORMAT = "kedit-second-moment"
_CACHE_VERSION = "1"


@dataclass(frozen=True, eq=False)
class SecondMoment:
    """Uncentred second moment ``mean = E[k kᵀ]`` (``[d_k, d_k]``, on the CPU) over ``count`` tokens.

    Tensors returned by :class:`StatsCache` are shared with the cache: do not modify them in place.
    """

    mean: torch.Tensor
    count: int

    @property
    def dtype(self) -> torch.dtype:
        return self.mean.dtype


# -- helpers -----------------------------------------------------------------------------------------------------
def default_max_length(model: nn.Module) -> int:
    """``min(model max positions, 1024)`` (1024 when the config does not say)."""
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return min(value, 1024)
    return 1024


def _encode_texts(
    tokenizer: Any, texts: Iterable[str], max_length: int
) -> Iterator[tuple[str, torch.Tensor]]:
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"corpus items must be strings, got {type(text).__name__}")
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        if ids:
            yield text, torch.tensor(ids, dtype=torch.int32)


def _take_prefix(
    encoded: Iterable[tuple[str, torch.Tensor]], n_tokens: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield encoded texts until their token counts reach ``n_tokens`` (the last one may be cut later)."""
    seen = 0
    for item in encoded:
        if seen >= n_tokens:
            return
        yield item
        seen += int(item[1].numel())


def corpus_hash(texts: Iterable[str]) -> str:
    """sha256 over the given texts (length-prefixed UTF-8, so boundaries matter)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def default_cache_dir() -> Path:
    """kedit's cache root: ``$KEDIT_CACHE``, else ``$XDG_CACHE_HOME/kedit``, else ``~/.cache/kedit`` (not created)."""
    explicit = os.environ.get("KEDIT_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kedit"


def default_stats_dir() -> Path:
    """Where the command line keeps second-moment statistics: ``default_cache_dir() / "stats"``."""
    return default_cache_dir() / "stats"


#: backend state that changes with how the tokenizer is *called*, not with the ids it produces
_TOKENIZER_CALL_STATE = ("truncation", "padding")


def _backend_state(backend: Any) -> str:
    text = backend.to_str()
    try:
        state = json.loads(text)
    except ValueError:  # pragma: no cover - to_str is JSON for every tokenizers release
        return text
    if isinstance(state, dict):
        for k in _TOKENIZER_CALL_STATE:
            state.pop(k, None)
    return json.dumps(state, sort_keys=True)


def _tokenizer_key(tokenizer: Any) -> str:
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(_backend_state(backend).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str).encode())
    return h.hexdigest()


def _batches(items: Iterable[tuple[str, torch.Tensor]], batch_size: int) -> Iterator[list[torch.Tensor]]:
    it = iter(items)
    while True:
        chunk = list(itertools.islice(it, batch_size))
        if not chunk:
            return
        yield [ids for _, ids in chunk]


def _forward_kwargs(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return set()


def _normalise_layers(adapter: ArchAdapter, model: nn.Module, layers: Iterable[int]) -> list[int]:
    if isinstance(layers, int):
        layers = [layers]
    out = sorted({adapter.check_layer(model, int(layer)) for layer in layers})
    if not out:
        raise ValueError("give at least one layer")
    return out


def _collect_encoded(
    model: nn.Module,
    encoded: Iterable[tuple[str, torch.Tensor]],
    layers: list[int],
    *,
    n_tokens: int,
    batch_size: int,
    pad_id: int,
    dtype: torch.dtype,
    adapter: ArchAdapter,
    progress: ProgressFn | None,
) -> dict[int, SecondMoment]:
    paths = {layer: adapter.path("mlp_out", layer) for layer in layers}
    device = device_of(model)
    accepted = _forward_kwargs(model)
    sums: dict[int, torch.Tensor] = {}
    done = 0
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            for seqs in _batches(_take_prefix(encoded, n_tokens), batch_size):
                input_ids, mask = pad_batch(seqs, pad_id)
                kwargs: dict[str, Any] = {
                    "input_ids": input_ids.to(device),
                    "attention_mask": mask.to(device),
                }
                if "position_ids" in accepted:  # explicit positions of the real tokens (0, 1, 2, ...)
                    kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
                if "use_cache" in accepted:
                    kwargs["use_cache"] = False
                with trace(
                    model, list(paths.values()), retain_input=True, retain_output=False, stop=True
                ) as tr:
                    model(**kwargs)
                keep = mask.to(device).bool()
                n_batch = int(keep.sum())
                take = min(n_batch, n_tokens - done)
                for layer, path in paths.items():
                    k = tr[path].input
                    if k is None:
                        raise RuntimeError(f"the forward pass never reached {path!r}")
                    # row-major: text order, then position; on the layer's device (a shard of a split model)
                    k = k[keep.to(k.device)][:take].to(dtype)
                    if not bool(torch.isfinite(k).all()):
                        raise FloatingPointError(
                            f"non-finite activations at the input of {path!r}: the model's forward overflowed "
                            f"({next(model.parameters()).dtype}); statistics would be meaningless"
                        )
                    kkt = k.T @ k
                    sums[layer] = kkt if layer not in sums else sums[layer].add_(kkt)
                done += take
                if progress is not None:
                    progress(done, n_tokens)
                if done >= n_tokens:
                    break
    finally:
        for m, training in modes:
            m.training = training
    if done == 0:
        raise ValueError("the corpus yielded no tokens")
    if done < n_tokens:
        logger.warning("corpus exhausted after %d of the requested %d tokens", done, n_tokens)
    return {layer: SecondMoment(mean=(s / done).cpu(), count=done) for layer, s in sums.items()}


def _check_common(n_tokens: int, batch_size: int, dtype: torch.dtype) -> None:
    if not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")


# -- public API --------------------------------------------------------------------------------------------------
def collect_second_moments(
    model: nn.Module,
    tokenizer: Any,
    layers: Iterable[int],
    texts: Iterable[str],
    *,
    n_tokens: int,
    batch_size: int = 8,
    max_length: int | None = None,
    dtype: torch.dtype = torch.float64,
    adapter: ArchAdapter | None = None,
    progress: ProgressFn | None = None,
) -> dict[int, SecondMoment]:
    """``E[k kᵀ]`` of the ``mlp_out`` input at each of ``layers``, in one forward pass per batch.

    Args:
        model: a causal LM (left in its original train/eval mode and bit-identical).
        tokenizer: its tokenizer, only used to encode texts (never modified; no pad token needed). Batches are
            always right-padded internally (:func:`kedit.core.batching.pad_batch`), so the tokenizer's ``padding_side`` does not matter.
        layers: layer indices (negative ones count from the end); the result is keyed by the non-negative index.
        texts: any iterable of strings, consumed lazily and only as far as needed.
        n_tokens: exact number of (non-pad) tokens to average over; fewer if the corpus runs out (logged).
        batch_size: texts per forward pass.
        max_length: texts are truncated to this many tokens (default ``min(max positions, 1024)``).
        dtype: accumulation dtype, ``torch.float64`` (default) or ``torch.float32``.
        adapter: architecture adapter (default: from ``model.config.model_type``).
        progress: ``progress(done_tokens, n_tokens)`` after every batch.
    """
    _check_common(n_tokens, batch_size, dtype)
    adapter = adapter or get_adapter(model)
    layer_list = _normalise_layers(adapter, model, layers)
    max_length = max_length or default_max_length(model)
    pad_id = _pad_id(tokenizer)
    return _collect_encoded(
        model,
        _encode_texts(tokenizer, texts, max_length),
        layer_list,
        n_tokens=n_tokens,
        batch_size=batch_size,
        pad_id=pad_id,
        dtype=dtype,
        adapter=adapter,
        progress=progress,
    )


class StatsCache:
    """Explicit cache of :class:`SecondMoment` s (in memory, plus ``directory`` on disk when given).

    Args:
        directory: where ``<key-hash>.safetensors`` files are read and written (``None``: memory only).
        keep_in_memory: also keep results on this object (each entry is ``d_k² · 8`` bytes in fp64 -- ~1 GB for
            ``d_k = 11008``; turn off for big models when a directory is given).
    """

    def __init__(self, directory: str | Path | None = None, *, keep_in_memory: bool = True) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.keep_in_memory = keep_in_memory
        self._memory: dict[str, SecondMoment] = {}

    def __len__(self) -> int:
        return len(self._memory)

    def entries(self) -> list[dict[str, Any]]:
        """The entries on disk (oldest first): ``key``, ``path``, ``bytes`` and their metadata (``model_key``,
        ``layer``, ``module``, ``n_tokens``, ``dtype``, ``corpus``, ...). Only the file headers are read."""
        if self.directory is None or not self.directory.is_dir():
            return []
        from safetensors import SafetensorError, safe_open

        out = []
        for path in sorted(self.directory.glob("*.safetensors"), key=lambda p: (p.stat().st_mtime, p.name)):
            entry: dict[str, Any] = {"key": path.stem, "path": str(path), "bytes": path.stat().st_size}
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
            except (SafetensorError, OSError, ValueError):
                meta = {"format": "unreadable"}
            entry.update({k: v for k, v in meta.items() if k not in ("key", "path", "bytes")})
            out.append(entry)
        return out

    def remove(self, keys: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Delete entries from disk (and memory): every entry if ``keys`` is ``None``, else those whose key starts
        with one of ``keys`` (each must match exactly one entry). Returns the removed entries."""
        entries = self.entries()
        if keys is None:
            chosen = entries
        else:
            chosen = []
            for k in keys:
                hits = [e for e in entries if e["key"].startswith(k)]
                if len(hits) != 1:
                    raise KeyError(f"{k!r} matches {len(hits)} cache entries in {self.directory}; give a unique key "
                                   "prefix (see `kedit cache ls`)")
                chosen.extend(hits)
        for e in chosen:
            Path(e["path"]).unlink(missing_ok=True)
            self._memory.pop(e["key"], None)
        return chosen

    def clear_memory(self) -> None:
        self._memory.clear()

    @staticmethod
    def _key(fields: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def _path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{key}.safetensors"

    def _read(self, key: str, fields: dict[str, Any]) -> SecondMoment | None:
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                mean = f.get_tensor("mean")
        except (SafetensorError, OSError, ValueError) as e:  # corrupt file: recompute and overwrite
            logger.warning("ignoring unreadable stats cache file %s (%s)", path, e)
            return None
        expected = {k: str(v) for k, v in fields.items()}
        got = {k: meta.get(k) for k in expected}
        if meta.get("format") != _CACHE_FORMAT or got != expected or "count" not in meta:
            logger.warning("ignoring stats cache file %s: metadata does not match its key", path)
            return None
        if mean.dtype != getattr(torch, fields["dtype"]) or mean.ndim != 2 or mean.shape[0] != mean.shape[1]:
            logger.warning(
                "ignoring stats cache file %s: unexpected tensor %s %s", path, mean.dtype, mean.shape
            )
            return None
        return SecondMoment(mean=mean, count=int(meta["count"]))

    def _write(self, key: str, fields: dict[str, Any], sm: SecondMoment) -> None:
        path = self._path(key)
        if path is None:
            return
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {k: str(v) for k, v in fields.items()}
        meta.update(format=_CACHE_FORMAT, count=str(sm.count))
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"mean": sm.mean.contiguous()}, tmp, metadata=meta)
            os.replace(tmp, path)  # atomic: readers never see half a file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def get(
        self,
        model: nn.Module,
        tokenizer: Any,
        layers: Iterable[int],
        texts: Iterable[str],
        *,
        n_tokens: int,
        corpus_id: str | None = None,
        dtype: torch.dtype = torch.float64,
        model_key: str | None = None,
        batch_size: int = 8,
        max_length: int | None = None,
        adapter: ArchAdapter | None = None,
        progress: ProgressFn | None = None,
    ) -> dict[int, SecondMoment]:
        """Second moments for ``layers``: cached ones are returned, the missing ones computed in one pass.

        ``model_key`` defaults to :func:`kedit.fingerprint.model_fingerprint`; ``corpus_id`` (if given) replaces the
        hash of the consumed texts (see the module docstring). Other arguments as in
        :func:`collect_second_moments`.
        """
        _check_common(n_tokens, batch_size, dtype)
        adapter = adapter or get_adapter(model)
        layer_list = _normalise_layers(adapter, model, layers)
        max_length = max_length or default_max_length(model)
        pad_id = _pad_id(tokenizer)
        model_key = model_key or model_fingerprint(model)

        encoded: Iterable[tuple[str, torch.Tensor]]
        if corpus_id is not None:
            corpus_key = f"id:{corpus_id}"
            encoded = _encode_texts(tokenizer, texts, max_length)  # streamed, only on a miss
        else:
            prefix = list(_take_prefix(_encode_texts(tokenizer, texts, max_length), n_tokens))
            corpus_key = "sha256:" + corpus_hash(text for text, _ in prefix)
            encoded = prefix
        common = {
            "format_version": _CACHE_VERSION,
            "model_key": model_key,
            "corpus": corpus_key,
            "n_tokens": n_tokens,
            "dtype": str(dtype).removeprefix("torch."),
            "max_length": max_length,
            "tokenizer": _tokenizer_key(tokenizer),
        }
        result: dict[int, SecondMoment] = {}
        keys: dict[int, tuple[str, dict[str, Any]]] = {}
        for layer in layer_list:
            fields = {**common, "layer": layer, "module": adapter.path("mlp_out", layer)}
            key = self._key(fields)
            keys[layer] = (key, fields)
            sm = self._memory.get(key) or self._read(key, fields)
            if sm is not None:
                result[layer] = sm
                if self.keep_in_memory:
                    self._memory[key] = sm
        missing = [layer for layer in layer_list if layer not in result]
        if missing:
            logger.info("computing second moments for layers %s over %d tokens", missing, n_tokens)
            computed = _collect_encoded(
                model,
                encoded,
                missing,
                n_tokens=n_tokens,
                batch_size=batch_size,
                pad_id=pad_id,
                dtype=dtype,
                adapter=adapter,
                progress=progress,
            )
            for layer, sm in computed.items():
                key, fields = keys[layer]
                self._write(key, fields, sm)
                if self.keep_in_memory:
                    self._memory[key] = sm
                result[layer] = sm
        return {layer: result[layer] for layer in layer_list}
