"""The on-disk form of an :class:`~kedit.deltas.EditDelta` (a directory, peft-style config + safetensors).

* ``edit_config.json`` (:data:`CONFIG_NAME`): format tag and version, kedit version, method, config, requests,
  meta, fingerprints, one entry per update (kind, param, shape, dtype, rank, tensor keys) and the names of the
  extras.
* ``edit_delta.safetensors`` (:data:`WEIGHTS_NAME`): the update tensors under ``<param>.<part>`` (``a``/``b`` for
  :class:`~kedit.deltas.LowRankUpdate`, ``delta`` for :class:`~kedit.deltas.DenseUpdate`) and the extras under
  ``extras::<name>``.
* ``edit_originals.safetensors`` (:data:`ORIGINALS_NAME`, optional): the tensors the delta was applied to and the
  post-apply fingerprints, for a bitwise :meth:`~kedit.deltas.EditDelta.revert_saved` on an edited checkpoint.

Format versions: 2 (:data:`FORMAT_VERSION`) adds the ``extras``; a delta without extras is written as version 1
(readable by older kedit releases), and both are read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kedit.deltas.errors import DeltaFormatError, DeltaStateError, NonFiniteDeltaError
from kedit.deltas.updates import KINDS, ParamUpdate

if TYPE_CHECKING:
    from kedit.deltas.delta import EditDelta

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "ORIGINALS_NAME",
    "READABLE_VERSIONS",
    "WEIGHTS_NAME",
    "kedit_version",
    "load_delta",
    "read_delta",
    "write_delta",
]

#: version of the on-disk format written by :meth:`EditDelta.save <kedit.deltas.EditDelta.save>`
FORMAT_VERSION = 2
#: versions :func:`load_delta` reads
READABLE_VERSIONS = (1, 2)
CONFIG_NAME = "edit_config.json"
WEIGHTS_NAME = "edit_delta.safetensors"
#: optional file with the pre-apply tensors, written by ``save(..., include_originals=True)``
ORIGINALS_NAME = "edit_originals.safetensors"
FORMAT_TAG = "kedit-edit-delta"
#: prefix of the extras' keys in the weights file (cannot clash with a parameter name)
EXTRA_PREFIX = "extras::"


def kedit_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kedit")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without metadata
        return "0+unknown"


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


def write_delta(delta: EditDelta, directory: str | Path, *, include_originals: bool = False) -> Path:
    """Write ``delta`` into ``directory`` (see :meth:`EditDelta.save <kedit.deltas.EditDelta.save>`)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if delta.updates and delta.updates[0].is_memory:
        include_originals = False  # memory entries change no weight: there is nothing to restore
    if include_originals and not delta.is_applied:
        raise DeltaStateError("include_originals=True needs an applied delta (the originals are kept by apply)")
    originals = delta.originals() if include_originals else None  # before touching the directory
    directory.mkdir(parents=True, exist_ok=True)
    if originals is not None:
        save_file(
            {k: _cpu(v) for k, v in originals.items()},
            str(directory / ORIGINALS_NAME),
            metadata={"format": FORMAT_TAG, "post_apply_fingerprints": json.dumps(delta.post_apply_fingerprints)},
        )
    elif (directory / ORIGINALS_NAME).exists():
        (directory / ORIGINALS_NAME).unlink()
    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for u in delta.updates:
        keys = []
        for suffix, t in u.tensors().items():
            key = f"{u.param}.{suffix}"
            tensors[key] = _cpu(t)
            keys.append(key)
        entry = {
            "kind": u.kind,
            "param": u.param,
            "shape": list(u.shape),
            "dtype": str(u.dtype).removeprefix("torch."),
            "rank": u.rank,
            "keys": keys,
        }
        if u.is_memory:
            entry["info"] = u.info  # type: ignore[attr-defined]
        entries.append(entry)
    for name, t in delta.extras.items():
        tensors[EXTRA_PREFIX + name] = _cpu(t)
    version = FORMAT_VERSION if delta.extras else 1  # the oldest version that can hold this delta
    config = {
        "format": FORMAT_TAG,
        "format_version": version,
        "kedit_version": kedit_version(),
        "method": delta.method,
        "config": delta.config,
        "requests": delta.requests,
        "meta": delta.meta,
        "fingerprints": delta.fingerprints,
        "updates": entries,
    }
    if delta.extras:
        config["extras"] = sorted(delta.extras)
    save_file(
        tensors,
        str(directory / WEIGHTS_NAME),
        metadata={"format": FORMAT_TAG, "format_version": str(version), "method": delta.method},
    )
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
    return directory


def read_delta(cls: type[EditDelta], directory: str | Path) -> EditDelta:
    """Read a delta written by :func:`write_delta`, validating the format version and the tensors against the
    config (raises :class:`~kedit.deltas.DeltaFormatError` naming the offending file)."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (cfg_path, w_path):
        if not path.is_file():
            raise DeltaFormatError(f"{path}: missing (is {directory} an edit delta directory?)")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DeltaFormatError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT_TAG:
        raise DeltaFormatError(f"{cfg_path}: not a kedit edit-delta config (format != {FORMAT_TAG!r})")
    version = config.get("format_version")
    if version not in READABLE_VERSIONS:
        raise DeltaFormatError(
            f"{cfg_path}: format_version {version!r} is not supported (this kedit reads {list(READABLE_VERSIONS)})"
        )
    try:
        with safe_open(str(w_path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise DeltaFormatError(f"{w_path}: cannot read safetensors file ({e})") from e
    if header.get("format") != FORMAT_TAG or header.get("format_version") != str(version):
        raise DeltaFormatError(
            f"{w_path}: metadata header says format {header.get('format')!r} version "
            f"{header.get('format_version')!r}; expected {FORMAT_TAG!r} version {version}"
        )
    updates: list[ParamUpdate] = []
    used: set[str] = set()
    extras: dict[str, torch.Tensor] = {}
    try:
        for e in list(config["updates"]):
            kind_cls = KINDS.get(e["kind"])
            if kind_cls is None:
                raise DeltaFormatError(f"{cfg_path}: unknown update kind {e['kind']!r}")
            param = e["param"]
            parts = {}
            for s in kind_cls.parts:
                key = f"{param}.{s}"
                if key not in tensors:
                    raise DeltaFormatError(f"{w_path}: missing tensor {key!r} listed in {CONFIG_NAME}")
                parts[s] = tensors[key]
                used.add(key)
            if kind_cls.is_memory:
                parts["info"] = dict(e["info"])
            upd = kind_cls(param, **parts)  # type: ignore[call-arg]
            if list(upd.shape) != list(e["shape"]) or str(upd.dtype).removeprefix("torch.") != e["dtype"]:
                raise DeltaFormatError(
                    f"{w_path}: tensors of {param!r} give shape {list(upd.shape)} / {upd.dtype}, but "
                    f"{CONFIG_NAME} says {e['shape']} / {e['dtype']}"
                )
            updates.append(upd)
        for name in list(config.get("extras", [])) if version >= 2 else []:
            key = EXTRA_PREFIX + str(name)
            if key not in tensors:
                raise DeltaFormatError(f"{w_path}: missing extra tensor {key!r} listed in {CONFIG_NAME}")
            extras[str(name)] = tensors[key]
            used.add(key)
    except (KeyError, TypeError) as e:
        raise DeltaFormatError(f"{cfg_path}: malformed update list ({e!r})") from e
    except (ValueError, NonFiniteDeltaError) as e:
        if isinstance(e, DeltaFormatError):
            raise
        raise DeltaFormatError(f"{w_path}: invalid update tensors ({e})") from e
    extra = set(tensors) - used
    if extra:
        raise DeltaFormatError(f"{w_path}: tensors not listed in {CONFIG_NAME}: {sorted(extra)}")
    try:
        delta = cls(
            updates=updates,
            method=config.get("method", "unknown"),
            config=config.get("config", {}),
            requests=config.get("requests", []),
            meta=config.get("meta", {}),
            fingerprints=config.get("fingerprints", {}),
            extras=extras,
        )
    except (TypeError, ValueError) as e:
        raise DeltaFormatError(f"{cfg_path}: invalid delta ({e})") from e
    o_path = directory / ORIGINALS_NAME
    if o_path.is_file():
        try:
            with safe_open(str(o_path), framework="pt") as f:
                post = json.loads((f.metadata() or {})["post_apply_fingerprints"])
                originals = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise DeltaFormatError(f"{o_path}: cannot read the saved originals ({e})") from e
        if set(originals) != set(delta.params) or set(post) != set(delta.params):
            raise DeltaFormatError(f"{o_path}: originals do not match the updated parameters")
        delta._saved_originals, delta._saved_post = originals, post
    return delta


def load_delta(directory: str | Path) -> EditDelta:
    """Load an :class:`~kedit.deltas.EditDelta` saved with :meth:`EditDelta.save <kedit.deltas.EditDelta.save>`."""
    from kedit.deltas.delta import EditDelta

    return read_delta(EditDelta, directory)
