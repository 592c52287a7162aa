"""The errors raised by :mod:`kedit.deltas` (one base class, :class:`DeltaError`, so callers can catch them all)."""

from __future__ import annotations

__all__ = [
    "DeltaError",
    "DeltaFormatError",
    "DeltaStateError",
    "DeltaSwallowedError",
    "FingerprintMismatchError",
    "NonFiniteDeltaError",
]


class DeltaError(RuntimeError):
    """Base class of every error raised by :mod:`kedit.deltas`."""


class NonFiniteDeltaError(DeltaError, ValueError):
    """An update (or the updated weight) contains NaN or Inf."""


class FingerprintMismatchError(DeltaError):
    """A targeted tensor differs from the one the delta was computed on."""


class DeltaSwallowedError(DeltaError):
    """Rounding to the parameter dtype swallowed the whole update of a parameter."""


class DeltaStateError(DeltaError):
    """Apply/revert called in the wrong state (already applied, not applied, out-of-order revert...)."""


class DeltaFormatError(DeltaError, ValueError):
    """An on-disk delta is missing, corrupted or of an unsupported format version."""
