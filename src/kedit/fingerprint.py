"""Content fingerprints of tensors and models (sha256 hex digests).

* :func:`tensor_fingerprint` hashes a tensor's dtype, shape and *every byte* -- two tensors get the same
  fingerprint iff they are bitwise identical (up to sha256 collisions). Used by :mod:`kedit.deltas` to check that
  a delta is applied to the very tensor it was computed on, and that revert happens in LIFO order.
* :func:`model_fingerprint` identifies a model's *weights* cheaply, for cache keys (:class:`kedit.core.stats.
  StatsCache`) and provenance records. It hashes the architecture config (minus volatile keys) and, for each named
  parameter in order, its name, shape, dtype and the bytes of a deterministic evenly strided sample of at most
  ``sample_size`` (65,536) elements.

Trade-off of the sampled model fingerprint
------------------------------------------
Hashing a 7B model byte by byte reads ~14 GB (seconds to tens of seconds); the sample reads < 10 MB even for
hundreds of parameters, so the fingerprint takes well under a second. Any change to the config, to a parameter's
name/shape/dtype, to the parameter order, or to *most* elements (fine-tuning, a rank-one ROME/MEMIT edit -- which
changes every element of the rows/columns it touches --, a dtype cast, a different seed) changes the fingerprint.
The stride is ``ceil(numel / sample_size)``, so for a 2-D weight with at most ``sample_size`` rows every row is
sampled at least once; an edit that touches only a few *elements* (or a few rows of a matrix with more rows than
``sample_size``) can go unnoticed. Pass ``full=True`` when that matters (every byte is hashed).

The parameter dtype is part of the hash (statistics computed from a bf16 forward are not those of an fp32 one);
it is taken from the parameters themselves, not from ``config.dtype`` -- the config field is unreliable (it is not
updated by ``model.to(dtype)``) and is therefore ignored, together with other bookkeeping keys.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import torch
from torch import nn

__all__ = ["DEFAULT_SAMPLE_SIZE", "model_fingerprint", "tensor_fingerprint"]

#: number of elements sampled per parameter by :func:`model_fingerprint` (unless ``full=True``)
DEFAULT_SAMPLE_SIZE = 65_536

#: config keys that do not describe the function the weights compute (paths, versions, runtime switches)
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "name_or_path",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "_commit_hash",
    }
)


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """The exact bytes of ``t`` (contiguous CPU copy, any dtype including bf16 / fp8)."""
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t.resolve_conj())
    if t.device.type == "meta":
        raise ValueError("cannot fingerprint a tensor on the meta device (weights not materialised)")
    flat = t.to("cpu").contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    u8 = flat.view(torch.uint8)
    return memoryview(u8.numpy()).cast("B")


def _update_header(h: Any, t: torch.Tensor) -> None:
    h.update(f"{t.dtype!s}|{tuple(t.shape)}|".encode())


def tensor_fingerprint(t: torch.Tensor) -> str:
    """sha256 hex digest of ``t``'s dtype, shape and exact bytes (device independent)."""
    h = hashlib.sha256()
    _update_header(h, t)
    if t.numel():
        h.update(_raw_bytes(t))
    return h.hexdigest()


def _clean_config(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _clean_config(v)
            for k, v in sorted(value.items())
            if k not in _VOLATILE_CONFIG_KEYS and not str(k).startswith("_")
        }
    if isinstance(value, (list, tuple)):
        return [_clean_config(v) for v in value]
    return value


def _config_json(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is None:
        return "null"
    data = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    return json.dumps(_clean_config(data), sort_keys=True, default=str)


def _strided_sample(p: torch.Tensor, sample_size: int) -> torch.Tensor:
    flat = p.detach().reshape(-1)
    n = flat.numel()
    if n <= sample_size:
        return flat
    step = math.ceil(n / sample_size)
    return flat[::step]  # strided view: only the sample is copied to the CPU


def model_fingerprint(
    model: nn.Module,
    *,
    full: bool = False,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    overrides: dict[str, torch.Tensor] | None = None,
) -> str:
    """sha256 hex digest identifying ``model``'s config and weights.

    Args:
        model: any ``nn.Module``; ``model.config`` (if present) is hashed without volatile keys.
        full: hash every byte of every parameter (exact, slower) instead of a strided sample.
        sample_size: at most this many evenly spaced elements are hashed per parameter when ``full`` is False.
        overrides: ``{param name: tensor}`` hashed in place of those parameters (e.g. the pristine copies of a
            rollback ledger: the fingerprint the model had before its applied deltas, without touching it).

    Buffers are not hashed (rotary tables and causal masks are derived from the config). Tied parameters are
    hashed once (``named_parameters`` de-duplicates them).
    """
    if sample_size < 1:
        raise ValueError("sample_size must be >= 1")
    h = hashlib.sha256()
    h.update(b"kedit-model-fingerprint-v1|")
    h.update(b"full|" if full else f"sample={sample_size}|".encode())
    h.update(_config_json(model).encode())
    for name, p in model.named_parameters():
        if overrides and name in overrides:
            p = overrides[name]
        h.update(f"|{name}|".encode())
        _update_header(h, p)
        data = p if full else _strided_sample(p, sample_size)
        if data.numel():
            h.update(_raw_bytes(data))
    return h.hexdigest()
