"""Side memories: edits kept beside the weights, each with an id (GRACE's codebook, :mod:`kedit.memory.codebook`).

The original weights are never changed. A memory method's delta holds :class:`~kedit.deltas.MemoryEntryUpdate`
entries; ``delta.apply(model)`` adds them here (the codebook's hook is installed on the layer at the first entry),
``delta.revert(model)`` removes them by id (in any order) and the last removal uninstalls the hook, so the model is
its original object again (no hook, no attribute; ``state_dict`` never changed). Directly::

    ids = edit_ids(model)                 # live edits, in edit order
    remove_edit(model, ids[3])            # that fact returns to its pre-edit answer, the others keep theirs
    save_memory(model, "out/memory")      # memory.safetensors + memory.json, with the base model's fingerprint
    load_memory(fresh_model, "out/memory")
    clear_memory(model)

Every call is all-or-nothing: a failed call (unknown id, a duplicate id, a file that is truncated or was saved for
another base model) raises naming the id or the file, and the memory is unchanged.

The memory lives on the model object under one attribute (:data:`MEMORY_ATTR`), one codebook per hooked module
(GRACE), or one side memory (:class:`~kedit.memory.side.SideMemory`, WISE) keyed ``<module path>#wise``. Which one
a record goes to is its ``method``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kedit.memory.codebook import Codebook, Entry, Record, fold
from kedit.memory.side import SideMemory

__all__ = [
    "MEMORY_ATTR",
    "memory_layer",
    "MEMORY_CONFIG",
    "MEMORY_TENSORS",
    "Codebook",
    "EditMemoryError",
    "Entry",
    "MemoryFormatError",
    "Record",
    "SideMemory",
    "UnknownEditError",
    "add_entries",
    "clear_memory",
    "edit_ids",
    "fold",
    "get_memory",
    "load_memory",
    "remove_edit",
    "remove_entries",
    "save_memory",
]

#: the model attribute holding ``{module path: Codebook}`` while at least one entry is live
MEMORY_ATTR = "_kedit_memory"
MEMORY_CONFIG = "memory.json"
MEMORY_TENSORS = "memory.safetensors"
FORMAT_TAG = "kedit-memory"
FORMAT_VERSION = 1


class EditMemoryError(ValueError):
    """A memory operation was refused (the memory is unchanged)."""


class UnknownEditError(EditMemoryError):
    """No live edit has this id."""


class MemoryFormatError(EditMemoryError):
    """A saved memory is malformed, truncated, or was saved for another base model."""


def memory_layer(model: nn.Module, layer: int | None, layer_fraction: float) -> int:
    """The block a memory method edits: ``layer`` when given (checked by :mod:`kedit.arch`), else
    ``round(layer_fraction · (n_layers − 1))`` -- one rule for GRACE and WISE, no module paths in their configs."""
    from kedit.arch import get_adapter

    adapter = get_adapter(model)
    if layer is not None:
        return adapter.check_layer(model, layer)
    return round(layer_fraction * (adapter.num_layers(model) - 1))

def get_memory(model: nn.Module) -> dict[str, Codebook | SideMemory]:
    """``{slot: Codebook | SideMemory}`` of ``model`` (empty when it has no memory); a codebook's slot is its module
    path, a WISE side memory's ``<module path>#wise``."""
    return dict(model.__dict__.get(MEMORY_ATTR) or {})


def edit_ids(model: nn.Module) -> list[str]:
    """Ids of the live edits, in edit order (per codebook)."""
    return [i for book in get_memory(model).values() for i in book.records]


def _dims(model: nn.Module, path: str) -> tuple[nn.Module, int, int]:
    from kedit.arch import math_weight

    try:
        module = model.get_submodule(path)
    except AttributeError as e:
        raise EditMemoryError(f"model ({type(model).__name__}) has no module {path!r}: the memory was made for "
                              "another architecture") from e
    out_f, in_f = math_weight(module).shape
    return module, int(in_f), int(out_f)


def _slot(path: str, method: str) -> str:
    return f"{path}#{SideMemory.kind}" if method == SideMemory.kind else path


def _new_book(path: str, method: str, d_in: int, d_out: int) -> Codebook | SideMemory:
    return SideMemory(path, d_in, d_out) if method == SideMemory.kind else Codebook(path, d_in, d_out)


def _set(model: nn.Module, books: dict[str, Codebook | SideMemory]) -> None:
    books = {p: b for p, b in books.items() if len(b)}
    if books:
        model.__dict__[MEMORY_ATTR] = books
    else:
        model.__dict__.pop(MEMORY_ATTR, None)


def _add(model: nn.Module, records: Sequence[Record], modules: Sequence[str]) -> None:
    books = get_memory(model)
    live = set(edit_ids(model))
    seen: set[str] = set()
    hosts: dict[str, nn.Module] = {}
    for r, path in zip(records, modules):
        if r.edit_id in live or r.edit_id in seen:
            raise EditMemoryError(f"edit id {r.edit_id!r} is already in the memory (apply a delta once)")
        seen.add(r.edit_id)
        module, d_in, d_out = _dims(model, path)
        if r.method == SideMemory.kind:
            try:
                SideMemory.check(r, d_in, d_out, path)
            except ValueError as e:
                raise EditMemoryError(str(e)) from e
        elif tuple(r.key.shape) != (d_in,) or tuple(r.value.shape) != (d_out,):
            raise EditMemoryError(
                f"edit {r.edit_id!r}: key {tuple(r.key.shape)} / value {tuple(r.value.shape)} do not fit {path!r} "
                f"(input {d_in}, output {d_out}): made for another model")
        hosts[path] = module
    snaps = {p: b.snapshot() for p, b in books.items()}
    try:
        slots = {_slot(p, r.method): (p, r.method) for r, p in zip(records, modules)}
        for slot, (path, method) in slots.items():
            module = hosts[path]
            _, d_in, d_out = _dims(model, path)
            book = books.get(slot) or _new_book(path, method, d_in, d_out)
            dev = module.weight.device
            cdt = torch.float64 if module.weight.dtype == torch.float64 else torch.float32
            book.add([Record(r.edit_id, r.key.detach().to(dev, cdt), r.value.detach().to(dev, cdt),
                             r.label, float(r.epsilon), r.method, r.request, r.info)
                      for r, p in zip(records, modules) if _slot(p, r.method) == slot])
            book.install(module, model)
            books[slot] = book
    except BaseException:
        for path, book in books.items():
            if path in snaps:
                book.restore(snaps[path])
            elif book.handle is not None:
                book.uninstall()
        raise
    _set(model, books)


def _record_info(info: dict[str, Any]) -> dict[str, Any] | None:
    """What a record keeps of an update's ``info``: all of it for WISE; GRACE's replacement span when set."""
    if info["method"] == SideMemory.kind:
        return dict(info)
    return {"span": int(info["span"])} if "span" in info else None


def add_entries(model: nn.Module, updates: Sequence[Any]) -> None:
    """Add :class:`~kedit.deltas.MemoryEntryUpdate` entries (what ``EditDelta.apply`` calls); all-or-nothing."""
    records = [Record(u.edit_id, u.key, u.value, str(u.info["label"]), float(u.info["epsilon"]),
                      str(u.info["method"]), u.info.get("request"),
                      _record_info(u.info)) for u in updates]
    _add(model, records, [str(u.info["module"]) for u in updates])


def remove_entries(model: nn.Module, ids: Sequence[str], *, missing_ok: bool = False) -> None:
    """Remove the edits ``ids`` (an unknown id raises :class:`UnknownEditError` naming it, memory unchanged,
    unless ``missing_ok``); the codebook of a layer whose last edit goes is uninstalled."""
    books = get_memory(model)
    where = {i: p for p, b in books.items() for i in b.records}
    unknown = [i for i in ids if i not in where]
    if unknown and not missing_ok:
        raise UnknownEditError(f"no live edit with id {unknown[0]!r} in this model's memory "
                               f"({len(where)} live edit(s))")
    by_book: dict[str, list[str]] = {}
    for i in dict.fromkeys(ids):
        if i in where:
            by_book.setdefault(where[i], []).append(i)
    for path, drop in by_book.items():
        book = books[path]
        book.remove(drop)
        if not len(book):
            book.uninstall()
    _set(model, books)


def remove_edit(model: nn.Module, edit_id: str) -> None:
    """Remove one edit by id (see :func:`remove_entries`). An applied delta holding it stays applied; reverting it
    later removes its remaining entries."""
    remove_entries(model, [edit_id])


def clear_memory(model: nn.Module) -> None:
    """Remove every edit and uninstall every codebook."""
    remove_entries(model, edit_ids(model))


# -- persistence -------------------------------------------------------------------------------------------------
def save_memory(model: nn.Module, directory: str | Path) -> Path:
    """Write ``memory.json`` (records, caps, the base model's fingerprint) and ``memory.safetensors`` (keys and
    values) into ``directory``."""
    from safetensors.torch import save_file

    from kedit.deltas.serialization import kedit_version
    from kedit.fingerprint import model_fingerprint

    books = get_memory(model)
    tensors: dict[str, torch.Tensor] = {}
    out = []
    for book in books.values():
        recs = []
        for r in book.records.values():
            for part in ("key", "value"):
                tensors[f"{book.module_path}::{r.edit_id}.{part}"] = getattr(r, part).detach().cpu().contiguous().clone()
            rec = {"edit_id": r.edit_id, "label": r.label, "epsilon": r.epsilon, "method": r.method,
                   "request": r.request}
            if r.info is not None:
                rec["info"] = r.info
            recs.append(rec)
        entry: dict[str, Any] = {"module": book.module_path, "records": recs}
        if isinstance(book, SideMemory):
            entry["kind"] = SideMemory.kind
        else:
            entry["caps"] = dict(book.caps)
        out.append(entry)
    cfg = getattr(model, "config", None)
    config = {
        "format": FORMAT_TAG,
        "format_version": FORMAT_VERSION,
        "kedit_version": kedit_version(),
        "base_model_fingerprint": model_fingerprint(model),
        "name_or_path": getattr(cfg, "_name_or_path", "") or "",
        "model_type": getattr(cfg, "model_type", None),
        "codebooks": out,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / MEMORY_TENSORS),
              metadata={"format": FORMAT_TAG, "format_version": str(FORMAT_VERSION), "n_tensors": str(len(tensors))})
    (directory / MEMORY_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_memory(model: nn.Module, directory: str | Path) -> list[str]:
    """Load a memory written by :func:`save_memory` into ``model`` (which must have none); returns the edit ids.

    Refused (:class:`MemoryFormatError` naming the file; the model is unchanged) when a file is missing, truncated
    or malformed, or when it was saved for another base model (fingerprint mismatch).
    """
    from safetensors import SafetensorError, safe_open

    from kedit.fingerprint import model_fingerprint

    directory = Path(directory)
    cfg_path, t_path = directory / MEMORY_CONFIG, directory / MEMORY_TENSORS
    for p in (cfg_path, t_path):
        if not p.is_file():
            raise MemoryFormatError(f"{p}: missing (is {directory} a saved kedit memory?)")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MemoryFormatError(f"{cfg_path}: not valid JSON (truncated?) ({e})") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT_TAG:
        raise MemoryFormatError(f"{cfg_path}: not a kedit memory (format != {FORMAT_TAG!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise MemoryFormatError(f"{cfg_path}: format_version {config.get('format_version')!r} is not supported")
    fp = model_fingerprint(model)
    if config.get("base_model_fingerprint") != fp:
        raise MemoryFormatError(
            f"{cfg_path}: this memory was saved for another base model ({config.get('name_or_path') or '?'}, "
            f"fingerprint {str(config.get('base_model_fingerprint'))[:12]}...), not this one ({fp[:12]}...)")
    try:
        with safe_open(str(t_path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise MemoryFormatError(f"{t_path}: cannot read safetensors file (truncated?) ({e})") from e
    if header.get("format") != FORMAT_TAG or header.get("n_tensors") != str(len(tensors)):
        raise MemoryFormatError(f"{t_path}: metadata header does not match a kedit memory of {len(tensors)} tensors")
    if get_memory(model):
        raise EditMemoryError(f"{directory}: the model already has a memory ({len(edit_ids(model))} edit(s)); "
                              "clear_memory(model) first")
    records: list[Record] = []
    modules: list[str] = []
    caps: dict[str, dict[str, float]] = {}
    try:
        used = set()
        for book in config["codebooks"]:
            path = str(book["module"])
            for rec in book["records"]:
                rid = str(rec["edit_id"])
                parts = {}
                for part in ("key", "value"):
                    name = f"{path}::{rid}.{part}"
                    if name not in tensors:
                        raise MemoryFormatError(f"{t_path}: missing tensor {name!r} listed in {MEMORY_CONFIG}")
                    parts[part] = tensors[name]
                    used.add(name)
                    if not bool(torch.isfinite(parts[part]).all()):
                        raise MemoryFormatError(f"{t_path}: tensor {name!r} has non-finite values")
                method = str(rec.get("method", "grace"))
                if (method == SideMemory.kind) != (book.get("kind") == SideMemory.kind):
                    raise MemoryFormatError(f"{cfg_path}: record {rid!r} ({method}) is in a memory of another kind")
                info = rec.get("info")
                records.append(Record(rid, parts["key"], parts["value"], str(rec["label"]), float(rec["epsilon"]),
                                      method, rec.get("request"), None if info is None else dict(info)))
                modules.append(path)
            if book.get("kind") != SideMemory.kind:
                caps[path] = {str(k): float(v) for k, v in dict(book.get("caps", {})).items()}
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, MemoryFormatError):
            raise
        raise MemoryFormatError(f"{cfg_path}: malformed codebook list ({e!r})") from e
    if set(tensors) - used:
        raise MemoryFormatError(f"{t_path}: tensors not listed in {MEMORY_CONFIG}: {sorted(set(tensors) - used)[:3]}")
    # the caps shape the fold: set them before the records are folded in
    books: dict[str, Codebook | SideMemory] = {}
    for r, path in zip(records, modules):
        slot = _slot(path, r.method)
        if slot not in books:
            _, d_in, d_out = _dims(model, path)
            books[slot] = _new_book(path, r.method, d_in, d_out)
            if isinstance(books[slot], Codebook):
                books[slot].caps = caps.get(path, {})
    try:
        model.__dict__[MEMORY_ATTR] = books
        _add(model, records, modules)
    except BaseException:
        for b in books.values():
            b.uninstall()
        model.__dict__.pop(MEMORY_ATTR, None)
        raise
    return [r.edit_id for r in records]
