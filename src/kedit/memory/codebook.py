"""A discrete key-value codebook at one layer (GRACE's adaptor; Hartvigsen et al., "Aging with GRACE: Lifelong
Model Editing with Discrete Key-Value Adaptors", NeurIPS 2023).

The codebook sits on one Linear/Conv1D module (the layer kedit.arch names; GRACE uses the MLP output projection)
through a forward hook, so the module, its parameters and the ``state_dict`` are never changed. At every forward
(prefill and each KV-cached decode step alike) every real position's layer input ``h`` is a query: with ``k_i``
the nearest key (Euclidean) and ``ε_i`` its deferral radius, the query *hits* when ``‖h − k_i‖ ≤ ε_i``.

**Span.** A hit at position ``p`` replaces the layer output by the value ``v_i`` at ``p`` and at the next
``span_i − 1`` positions (``span_i`` = the entry's ``info["span"]``, 1 when absent), the positions its value was
trained on: the last prompt token and the target tokens after it. The latest hit of a row governs; a span that
runs past the end of a forward is carried into the row's next KV-cached decode steps (the cache length and the
attention mask come from a pre-hook on the root model, :mod:`kedit.memory.sequence`). Pad positions (attention
mask 0) never hit, so a padded batch gives what each row gives alone. Without hits the module's own output is
returned untouched (bitwise the unedited model).

State and its rules
-------------------
The codebook's *records* (one per edit: edit id, key, trained value, target label, initial radius ``ε₀``) are
kept in edit order; the *entries* (centre, radius, owners) follow from them by GRACE's rules, applied record by
record (:func:`fold`):

* no entry, or ``d = ‖k − k_i‖ > ε₀ + ε_i`` for the nearest entry ``i``: a new entry ``(k, v, ε₀)``;
* ``d ≤ ε₀ + ε_i`` and the same label: **expand** -- ``ε_i ← max(ε_i, d)`` (the paper's "coverage" expansion),
  the new edit joins the entry's owners and the entry keeps its value;
* ``d ≤ ε₀ + ε_i`` and a different label: **split** -- ``ε_i ← d / 2`` and a new entry ``(k, v, d / 2)``; an
  edit that had *joined* the split entry by expansion and whose key the shrunk ball no longer covers gets an entry
  of its own (its key and trained value, radius ``min(ε₀, ‖k_o − k‖ / 2)``). The paper's rules would silently drop
  that edit (measured: 2 of 900 lost on testbed-gpt2 at T = 1000); this is kedit's rule;
* a different label on a key that *coincides* with the entry's centre (``d ≤`` :data:`SAME_KEY_RTOL` ``· ‖k‖``: the
  same prompt edited again, a re-edit): **replace** -- the newest edit takes the entry over (its key, value and
  label; the radius stays). The split rule would give both balls radius ``d / 2 ≈ 0`` and neither edit would
  answer any more, so the newest target must win here (kedit's rule; the paper does not discuss exact re-edits).
  The older edit's record stays: removing the newest edit brings the older answer back.

Adding edits continues the fold; removing one re-folds the remaining records, then clamps every surviving entry's
radius to what it was before the removal (*caps*, kept from then on): a removal never widens a ball, so the other
edits' answers stay what they were and the removed edit's prompt (its key now outside every ball) gets the
unedited output back, bitwise. The caps are part of the state (saved with it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kedit.memory.sequence import ForwardContext

__all__ = ["Codebook", "Entry", "Record", "fold", "span_of"]

#: relative slack on a radius at look-up time: an expanded ball's boundary key (``ε_i = d``) recomputed in another
#: batch shape differs from the stored one in the last bits
RADIUS_SLACK = 1e-3
#: a new key this close to an entry's centre (relative to its norm) is the same key: a re-edit replaces the entry
SAME_KEY_RTOL = 1e-4


@dataclass
class Record:
    """One edit's contribution: its id, key ``[d_in]`` and value ``[d_out]`` (fp32), label and initial radius."""

    edit_id: str
    key: torch.Tensor
    value: torch.Tensor
    label: str
    epsilon: float
    method: str = "grace"
    request: dict[str, Any] | None = None
    #: method-specific JSON (WISE: mask seed and ratio, token counts, ...); ``None`` for GRACE
    info: dict[str, Any] | None = None


def span_of(r: Record) -> int:
    """Positions a hit of ``r``'s entry replaces (``info["span"]``; 1 for records without one)."""
    return max(1, int((r.info or {}).get("span", 1)))


@dataclass
class Entry:
    """A ball of the codebook: centred on ``creator``'s key, holding its value, answering for ``owners``."""

    creator: str
    radius: float
    owners: list[str] = field(default_factory=list)


def fold(
    records: Sequence[Record],
    caps: dict[str, float] | None = None,
    start: tuple[list[Entry], list[torch.Tensor]] | None = None,
    by_id: dict[str, Record] | None = None,
) -> tuple[list[Entry], list[torch.Tensor]]:
    """Apply GRACE's add / expand / split rules to ``records`` in order (continuing ``start``); returns the entries
    and their centre keys. Radii of entries whose creator has a cap are clamped to it."""
    entries, keys = ([], []) if start is None else ([Entry(e.creator, e.radius, list(e.owners)) for e in start[0]],
                                                      list(start[1]))
    recs = {} if by_id is None else dict(by_id)
    labels = {rid: r.label for rid, r in recs.items()}
    caps = caps or {}
    for r in records:
        labels[r.edit_id] = r.label
        recs[r.edit_id] = r
        if entries:
            dist = torch.linalg.vector_norm(torch.stack(keys) - r.key, dim=1)
            i = int(torch.argmin(dist))
            d = float(dist[i])
            e = entries[i]
            if d <= r.epsilon + e.radius:
                if labels[e.creator] == r.label:  # expand
                    e.radius = min(max(e.radius, d), caps.get(e.creator, float("inf")))
                    e.owners.append(r.edit_id)
                    continue
                if d <= SAME_KEY_RTOL * float(torch.linalg.vector_norm(r.key)):  # re-edit: the newest wins
                    e.creator = r.edit_id
                    e.owners.append(r.edit_id)
                    keys[i] = r.key
                    continue
                e.radius = min(d / 2, caps.get(e.creator, float("inf")))  # split
                # an expanded owner the shrunk ball no longer covers gets its own entry (kedit's rule)
                for o in [o for o in e.owners if o != e.creator]:
                    ko = recs[o].key
                    if float(torch.linalg.vector_norm(ko - keys[i])) > e.radius:
                        e.owners.remove(o)
                        radius = min(recs[o].epsilon, float(torch.linalg.vector_norm(ko - r.key)) / 2,
                                     caps.get(o, float("inf")))
                        entries.append(Entry(o, radius, [o]))
                        keys.append(ko)
                entries.append(Entry(r.edit_id, min(d / 2, caps.get(r.edit_id, float("inf"))), [r.edit_id]))
                keys.append(r.key)
                continue
        entries.append(Entry(r.edit_id, min(r.epsilon, caps.get(r.edit_id, float("inf"))), [r.edit_id]))
        keys.append(r.key)
    return entries, keys


class _Hook:
    """The forward hook: a small callable so the codebook is not captured in a closure."""

    def __init__(self, book: Codebook) -> None:
        self.book = book

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        return self.book.replace(args[0], output)


class Codebook:
    """The records, entries and look-up tensors of one layer's memory (see the module docstring)."""

    def __init__(self, module_path: str, d_in: int, d_out: int) -> None:
        self.module_path = module_path
        self.d_in, self.d_out = d_in, d_out
        self.records: dict[str, Record] = {}
        self.caps: dict[str, float] = {}
        self.entries: list[Entry] = []
        self._keys: list[torch.Tensor] = []
        # fp32 (fp64 for fp64 models), on the layer's device
        self.keys: torch.Tensor | None = None  # [N, d_in]
        self.key_sq: torch.Tensor | None = None  # [N]: ‖k‖², for the nearest-key search
        self.values: torch.Tensor | None = None  # [N, d_out]
        self.radii: torch.Tensor | None = None  # [N], slack included
        self.spans: torch.Tensor | None = None  # [N] int64: positions a hit replaces (the value's training span)
        self.handle: Any = None
        self._root_handles: list[Any] = []
        self._ctx: tuple[torch.Tensor | None, int] | None = None
        #: (entry [B], remaining [B]) of spans that run into the next decode step of the same sequences
        self._carry: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- state --------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def snapshot(self) -> tuple:
        return (dict(self.records), dict(self.caps), [Entry(e.creator, e.radius, list(e.owners)) for e in self.entries],
                list(self._keys))

    def restore(self, snap: tuple) -> None:
        self.records, self.caps, self.entries, self._keys = dict(snap[0]), dict(snap[1]), list(snap[2]), list(snap[3])
        self._materialise()

    def add(self, records: Sequence[Record]) -> None:
        """Continue the fold with ``records`` (ids already checked to be new)."""
        self.entries, self._keys = fold(records, self.caps, (self.entries, self._keys), self.records)
        for r in records:
            self.records[r.edit_id] = r
        self._materialise()

    def remove(self, ids: Sequence[str]) -> None:
        """Drop the records ``ids`` and re-fold; surviving radii never grow (caps)."""
        before = {e.creator: e.radius for e in self.entries}
        for i in ids:
            del self.records[i]
            self.caps.pop(i, None)
        for creator, radius in before.items():
            if creator in self.records:
                self.caps[creator] = min(radius, self.caps.get(creator, float("inf")))
        self.entries, self._keys = fold(list(self.records.values()), self.caps)
        self._materialise()

    def _materialise(self) -> None:
        self._carry = None
        if not self.entries:
            self.keys = self.values = self.radii = self.key_sq = self.spans = None
            return
        self.keys = torch.stack(self._keys)
        self.key_sq = (self.keys * self.keys).sum(dim=1)
        self.values = torch.stack([self.records[e.creator].value for e in self.entries])
        self.radii = torch.tensor([e.radius * (1 + RADIUS_SLACK) for e in self.entries], dtype=self.keys.dtype,
                                  device=self.keys.device)
        self.spans = torch.tensor([span_of(self.records[e.creator]) for e in self.entries], dtype=torch.long,
                                  device=self.keys.device)

    def owner_of(self, edit_id: str) -> Entry | None:
        return next((e for e in self.entries if edit_id in e.owners), None)

    # -- look-up ------------------------------------------------------------------------------------------------
    def lookup(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For queries ``h [n, d_in]``: ``(hit [n] bool, entry index [n])``."""
        if self.keys is None:
            n = h.shape[0]
            return torch.zeros(n, dtype=torch.bool, device=h.device), torch.zeros(n, dtype=torch.long, device=h.device)
        q = h.to(device=self.keys.device, dtype=self.keys.dtype)
        # the nearest key by the matmul expansion ‖q‖² − 2 q·k + ‖k‖² (one GEMM: fast for thousands of entries),
        # then that key's distance computed directly, so a query equal to a key gets distance 0, not cancellation
        # noise. (The expansion can only pick another key than the exact nearest one when two keys are equidistant
        # to within its rounding, ~1e-7·‖q‖²: then either is the nearest.)
        d2 = self.key_sq[None, :] - 2.0 * (q @ self.keys.T)
        idx = d2.argmin(dim=1)
        dmin = torch.linalg.vector_norm(q - self.keys[idx], dim=1)
        return dmin <= self.radii[idx], idx

    def replace(self, x: torch.Tensor, output: Any) -> Any:
        if self.keys is None or not isinstance(output, torch.Tensor) or x.ndim < 2:
            return None
        x3 = x if x.ndim == 3 else x.unsqueeze(0)
        b, t = x3.shape[0], x3.shape[1]
        mask, past = self._ctx if self._ctx is not None else (None, 0)
        carry = self._carry if past > 0 and self._carry is not None and self._carry[0].numel() == b else None
        self._carry = None
        hit, idx = self.lookup(x3.reshape(-1, x3.shape[-1]))
        hit, idx = hit.view(b, t), idx.view(b, t)
        if mask is not None and mask.ndim == 2 and mask.shape[0] == b and mask.shape[1] >= t:
            hit = hit & mask[:, -t:].to(device=hit.device, dtype=torch.bool)
        if carry is None and not bool(hit.any()):
            return None  # the module's own output, untouched
        pos = torch.arange(t, device=hit.device).expand(b, t)
        latest = torch.where(hit, pos, torch.full_like(pos, -1)).cummax(dim=1).values  # latest hit at or before
        entry = idx.gather(1, latest.clamp_min(0))
        active = (latest >= 0) & (pos < latest + self.spans[entry])
        if carry is not None:
            c_entry, c_left = (c.to(hit.device) for c in carry)
            from_carry = (latest < 0) & (pos < c_left[:, None])
            entry = torch.where(from_carry, c_entry[:, None].expand(b, t), entry)
            active = active | from_carry
        # what runs on into this sequence's next decode step
        last_entry, end = entry[:, -1], torch.where(latest[:, -1] >= 0, latest[:, -1] + self.spans[entry[:, -1]], 0)
        left = torch.where(active[:, -1], end - t, 0)
        if carry is not None:
            left = torch.where(active[:, -1] & (latest[:, -1] < 0), c_left - t, left)
        if bool((left > 0).any()):
            self._carry = (last_entry, left.clamp_min(0))
        if not bool(active.any()):
            return None
        out3 = output if output.ndim == 3 else output.unsqueeze(0)
        new = out3.clone()
        rows = active.to(new.device)
        new[rows] = self.values[entry[active]].to(device=new.device, dtype=new.dtype)
        return new.view_as(output)

    # -- installation -------------------------------------------------------------------------------------------
    def install(self, module: nn.Module, root: nn.Module | None = None) -> None:
        """Hook ``module``; with ``root`` (the model), also the pre-hook that tells spans where a sequence starts
        (without it, spans do not carry into KV-cached decode steps)."""
        if self.handle is None:
            self.handle = module.register_forward_hook(_Hook(self))
            if root is not None and root is not module:
                self._root_handles = ForwardContext(self).install(root)

    def uninstall(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        for h in self._root_handles:
            h.remove()
        self._root_handles = []
        self._ctx = self._carry = None
