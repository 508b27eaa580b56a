"""LoRA products for a batch whose rows use different LoRA slots, in plain torch (no vLLM import).

Row ``i`` of a batch uses slot ``slots[i]`` of the stacked adapter weights
(``W[slot]``, shaped ``(slots, out, in)`` or vLLM's ``(slots, 1, out, in)``);
slot -1 means no adapter, and such a row gets nothing: a shrink writes 0, an
expand adds nothing.

* ``grouped_shrink`` / ``grouped_expand``: one matmul per slot present,
  ``x[rows] @ W[slot]^T``, the rows grouped by slot once (``row_groups``; one
  check when every row has the same slot, the common case).
* ``fused_lora_linear``: a whole LoRA linear (every slice's shrink and expand) in
  a few ops. One slot: ``x`` against that slot's A of every slice stacked, then
  against its B of every slice laid block-diagonally (two matmuls). Several
  slots: ``x`` against every slot's A at once, each row masked to its own slot's
  columns (slot -1 rows keep none), then one matmul per slice.
* ``SlotGroups`` and ``PackedWeights``: what a caller keeps between calls (the
  last batch's groups; the packed A and B per linear and slot, rebuilt when a
  slot's weights are written in place, seen by the tensors' version counters).

The timings behind this layout are in ``bench/kernels/lora_ops.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

#: ``[(slot, row indices, or None for every row)]``, one entry per slot present.
Groups = list[tuple[int, torch.Tensor | None]]


def row_groups(slots: torch.Tensor, rows: int) -> Groups | None:
    """The rows of each slot present in ``slots``; one slot broadcast over every row counts as every row.
    None when ``slots`` neither has one entry nor one per row (a shape the grouped ops leave to vLLM)."""
    flat = slots.reshape(-1)
    if flat.numel() == 1:
        return [(int(flat[0]), None)]
    if flat.numel() != rows or rows == 0:
        return None
    first = int(flat[0])
    if bool((flat == first).all()):
        return [(first, None)]
    return [(slot, (flat == slot).nonzero().squeeze(1)) for slot in torch.unique(flat).tolist()]


def no_lora_rows(slots: torch.Tensor, rows: int) -> torch.Tensor | None:
    """A boolean mask of the ``rows`` whose slot is -1 (one slot broadcasts to every row; rows past the end of
    ``slots`` are kept out), or None when no row has slot -1."""
    flat = slots.reshape(-1) < 0
    if not bool(flat.any()):
        return None
    if flat.numel() == 1:
        return torch.ones(rows, dtype=torch.bool, device=slots.device)
    mask = torch.zeros(rows, dtype=torch.bool, device=slots.device)
    shared = min(rows, flat.numel())
    mask[:shared] = flat[:shared]
    return mask


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _squeezed(weights: torch.Tensor) -> torch.Tensor:
    return weights.squeeze(1) if weights.dim() == 4 else weights


def grouped_shrink(inputs: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, groups: Groups | None,
                   scaling: float = 1.0) -> bool:
    """``out[i, :rank] = scaling * inputs[i] @ W[slot_i]^T`` (0 for slot -1). False (nothing written) when
    ``groups`` is None or ``out`` and ``inputs`` differ in rows."""
    if groups is None or out.shape[0] != inputs.shape[0]:
        return False
    weights = _squeezed(weights)
    out = out[:, : weights.shape[1]]
    x = _as(inputs, out.dtype)
    for slot, rows in groups:
        if slot < 0:
            out.zero_() if rows is None else out.index_fill_(0, rows, 0)
            continue
        w = _as(weights[slot], out.dtype).t()
        if rows is None and out.is_contiguous():
            torch.mm(x, w, out=out)
            if scaling != 1.0:
                out.mul_(scaling)
        elif rows is None:
            out.copy_(scaling * (x @ w))
        else:
            out.index_copy_(0, rows, scaling * (x.index_select(0, rows) @ w))
    return True


def grouped_expand(inputs: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, groups: Groups | None,
                   add_inputs: bool = True) -> bool:
    """``out[i, :n] (+)= inputs[i] @ W[slot_i, :n]^T`` with ``n`` the columns ``out`` and ``W`` share (nothing
    added, or 0 written, for slot -1). False (nothing written) when ``groups`` is None or ``out`` and
    ``inputs`` differ in rows."""
    if groups is None or out.shape[0] != inputs.shape[0]:
        return False
    weights = _squeezed(weights)
    width = min(weights.shape[1], out.shape[1])
    out = out[:, :width]
    x = _as(inputs, out.dtype)
    for slot, rows in groups:
        if slot < 0:
            if not add_inputs:
                out.zero_() if rows is None else out.index_fill_(0, rows, 0)
            continue
        w = _as(weights[slot, :width], out.dtype).t()
        y = x @ w if rows is None else x.index_select(0, rows) @ w
        if rows is None:
            out.add_(y) if add_inputs else out.copy_(y)
        else:
            out.index_add_(0, rows, y) if add_inputs else out.index_copy_(0, rows, y)
    return True


class SlotGroups:
    """The last batch's ``row_groups`` and per-token slots, so the many op calls of one model step compute
    them once (each call compares its slots with the last ones)."""

    def __init__(self) -> None:
        self._groups: tuple[torch.Tensor, Groups | None] | None = None
        self._tokens: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def groups(self, slots: torch.Tensor, rows: int) -> Groups | None:
        flat = slots.reshape(-1)
        if flat.numel() == 1 or flat.numel() != rows:
            return row_groups(flat, rows)
        if self._groups is not None and self._groups[0].shape == flat.shape and torch.equal(self._groups[0], flat):
            return self._groups[1]
        groups = row_groups(flat, rows)
        self._groups = (flat.clone(), groups)
        return groups

    def tokens(self, sequence_slots: torch.Tensor, sequence_lengths: torch.Tensor) -> torch.Tensor:
        """Each token's slot from each sequence's slot and length (vLLM's prefill metadata)."""
        last = self._tokens
        if last is not None and last[0].shape == sequence_slots.shape and last[1].shape == sequence_lengths.shape \
                and torch.equal(last[0], sequence_slots) and torch.equal(last[1], sequence_lengths):
            return last[2]
        tokens = torch.repeat_interleave(sequence_slots, sequence_lengths)
        self._tokens = (sequence_slots.clone(), sequence_lengths.clone(), tokens)
        return tokens


class PackedWeights:
    """``fused_lora_linear``'s packed A and B (float32), one entry per linear and slot (None: every slot), so
    at most ``linears * (slots + 1)`` entries. An entry is rebuilt when any of the linear's stacked tensors
    was written since (vLLM loads an adapter into a slot in place, which bumps the tensors' version counters)."""

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, a_stacked: Sequence[torch.Tensor], b_stacked: Sequence[torch.Tensor], slot: int | None,
            pack: Callable[[], tuple]) -> tuple:
        key = (id(a_stacked[0]), a_stacked[0].data_ptr(), slot)
        versions = tuple(t._version for t in (*a_stacked, *b_stacked))
        hit = self._entries.get(key)
        if hit is None or hit[0] != versions:
            hit = self._entries[key] = (versions, *pack())
        return hit[1:]


def _packed_all(a_stacked, b_stacked, output_slices, packed: PackedWeights) -> tuple:
    """(every slice's A for every slot stacked: (slices*slots*rank, in); per slice, every slot's B as
    (slots*rank, out)). Not block-diagonal as for one slot: with every slot the zeros would be most of the
    bytes a decode step reads."""
    return packed.get(a_stacked, b_stacked, None, lambda: (
        torch.cat([_squeezed(w).reshape(-1, w.shape[-1]) for w in a_stacked]).float(),
        [_squeezed(w)[:, :out].transpose(1, 2).reshape(-1, out).float() for w, out in zip(b_stacked, output_slices)]))


def _packed_slot(a_stacked, b_stacked, output_slices, slot: int, packed: PackedWeights) -> tuple:
    """(one slot's A of every slice stacked: (slices*rank, in); its B^T of every slice block-diagonally:
    (slices*rank, sum of outs))."""
    return packed.get(a_stacked, b_stacked, slot, lambda: (
        torch.cat([_squeezed(w)[slot] for w in a_stacked]).float(),
        torch.block_diag(*[_squeezed(w)[slot, :out].t() for w, out in zip(b_stacked, output_slices)]).float()))


def _slot_mask(slots: torch.Tensor, n_slots: int, rank: int, slices: int, masks: dict) -> torch.Tensor:
    """(rows, slices*slots*rank) 1.0 where a column belongs to the row's slot (none for slot -1), kept in
    ``masks``."""
    key = (n_slots, rank, slices)
    if key not in masks:
        one_hot = (slots.unsqueeze(1) == torch.arange(n_slots, device=slots.device)).to(torch.float32)
        masks[key] = one_hot.repeat_interleave(rank, 1).repeat(1, slices)
    return masks[key]


def _add_product(out: torch.Tensor, t: torch.Tensor, weights: torch.Tensor, scale: float) -> None:
    """``out += scale * t @ weights`` (float32 product; in place with addmm when ``out`` is float32)."""
    if out.dtype == torch.float32:
        out.addmm_(t, weights, alpha=scale)
    else:
        out.add_((scale * (t @ weights)).to(out.dtype))


def fused_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale: float, output_slices, slots,
                      groups: Groups | None = None, masks: dict | None = None,
                      packed: PackedWeights | None = None) -> bool:
    """``y[:, slice i] += scale * x @ A_i[slot]^T @ B_i[slot]^T`` for each row's slot (-1: nothing), in place.
    False (nothing done) for a shape it does not cover. ``groups``: ``row_groups(slots, rows)`` if already
    known; ``masks``: a dict kept for the batch's slot masks; ``packed``: the caller's ``PackedWeights``
    (without one, the weights are packed for this call only)."""
    x = x.view(-1, x.shape[-1])
    groups = row_groups(slots, x.shape[0]) if groups is None else groups
    if groups is None or y.shape[0] != x.shape[0] or slots.numel() not in (1, x.shape[0]) \
            or y.shape[1] != sum(output_slices) or not y.is_contiguous():
        return False
    packed = PackedWeights() if packed is None else packed
    if len(groups) == 1:
        if groups[0][0] >= 0:
            a, b = _packed_slot(lora_a_stacked, lora_b_stacked, output_slices, groups[0][0], packed)
            _add_product(y, _as(x, torch.float32) @ a.t(), b, scale)
        return True
    a, b = _packed_all(lora_a_stacked, lora_b_stacked, output_slices, packed)
    n_slots, rank = lora_a_stacked[0].shape[0], lora_a_stacked[0].shape[-2]
    mask = _slot_mask(slots.reshape(-1), n_slots, rank, len(output_slices), {} if masks is None else masks)
    t = (_as(x, torch.float32) @ a.t()).mul_(mask)
    width, offset = n_slots * rank, 0
    for i, (weights, out) in enumerate(zip(b, output_slices)):
        _add_product(y[:, offset:offset + out], t[:, i * width:(i + 1) * width], weights, scale)
        offset += out
    return True
