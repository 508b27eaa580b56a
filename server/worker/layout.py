"""What the running model does with each checkpoint tensor, asked of the model itself.

Every family names, fuses and stacks its tensors its own way (Llama's q/k/v into ``qkv_proj``, Phi-3's
already fused in the checkpoint, MoE experts stacked into ``w13``/``w2``, Gemma's norms, tied or untied
embeddings). vLLM's ``load_weights`` of the loaded model class knows; ``probe_layout`` runs it once over the
base's tensor names with every parameter's loader replaced by a recorder, so nothing is written, and learns
which module each checkpoint tensor loads into. From that:

* ``ModelLayout.siblings``: the checkpoint tensors that load into one module. vLLM's reload pass rebuilds a module
  from what it is given, so a swap that reloads one of them must reload all of them (q with k and v; one
  expert's weights with every expert of that layer).
* ``lora_names``: the checkpoint tensors vLLM's LoRA can adapt on this model (the modules its LoRA manager
  wrapped, under the names its own adapter check expects), so a recipe whose experts touch anything else
  is planned on the dense path instead of failing when vLLM loads the adapter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

_UNSET = object()


@dataclass
class ModelLayout:
    modules: dict[str, tuple[str, ...]] = field(default_factory=dict)   # checkpoint name -> modules it loads into
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)    # module -> checkpoint names loading into it

    def siblings(self, names: Iterable[str]) -> set[str]:
        """``names`` with every checkpoint tensor that shares a module with one of them."""
        out = set(names)
        for name in list(out):
            for module in self.modules.get(name, ()):
                out.update(self.groups[module])
        return out

    def modules_of(self, names: Iterable[str]) -> set[str]:
        """The modules ``names`` load into."""
        return {m for n in names for m in self.modules.get(n, ())}

    def unloadable(self, names: Iterable[str]) -> list[str]:
        """The names the model's loaders put nowhere (not part of this model)."""
        return sorted(n for n in names if not self.modules.get(n))


def probe_layout(model: torch.nn.Module, base: Mapping[str, Tensor]) -> ModelLayout:
    """Run ``model.load_weights`` over ``base``'s names, one tensor at a time, with recording loaders.

    The tensors given are empty ones of the right shape on the meta device (nothing is read from the
    checkpoint) unless the model's loader needs values, which then come from ``base`` (memory-mapped)."""
    owners = {id(p): name for name, module in model.named_modules()
              for p in module.parameters(recurse=False)
              for name in [name.removesuffix(".base_layer")]}
    current: list[str] = [""]
    found: dict[str, set[str]] = {}

    def record(param: Any, *args: Any, **kwargs: Any) -> bool:
        found.setdefault(current[0], set()).add(owners.get(id(param), "?"))
        return True   # MoE loaders ask whether the expert was theirs (return_success)

    saved = [(p, _loader_of(p)) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.weight_loader = record
        for name in base:
            current[0] = name
            try:
                model.load_weights(iter([(name, _meta_like(base, name))]))
            except Exception:   # noqa: BLE001 - a loader that computes on the values: give it the real tensor
                model.load_weights(iter([(name, base[name])]))
    finally:
        for p, loader in saved:
            if loader is _UNSET:
                del p.weight_loader
            else:
                p.weight_loader = loader
    layout = ModelLayout(modules={n: tuple(sorted(found.get(n, ()))) for n in base})
    groups: dict[str, list[str]] = {}
    for name, modules in layout.modules.items():
        for module in modules:
            groups.setdefault(module, []).append(name)
    layout.groups = {m: tuple(sorted(names)) for m, names in groups.items()}
    return layout


def _loader_of(param: Any) -> Any:
    """``param``'s own loader, to put back after the probe: vLLM's parameter classes keep it behind a property
    (deleting it there would delete the loader), a plain parameter in its ``__dict__`` (or has none)."""
    if isinstance(getattr(type(param), "weight_loader", None), property):
        return param.weight_loader
    return param.__dict__.get("weight_loader", _UNSET)


def _meta_like(base: Mapping[str, Tensor], name: str) -> Tensor:
    shape, dtype = _spec(base, name)
    return torch.empty(shape, dtype=dtype, device="meta")


def _spec(base: Mapping[str, Tensor], name: str) -> tuple[tuple[int, ...], torch.dtype]:
    spec = getattr(base, "spec", None)
    if spec is not None:
        return spec(name)
    tensor = base[name]
    return tuple(tensor.shape), tensor.dtype


def lora_names(model_runner: Any, layout: ModelLayout) -> list[str] | None:
    """The checkpoint tensors vLLM's LoRA adapts on this model; None when the engine runs without LoRA.

    A tensor qualifies when the module it loads into was wrapped by vLLM's LoRA manager as a linear layer
    and its own module name is one vLLM's adapter check expects (the supported modules, packed ones by their
    members) — what ``WorkerLoRAManager._load_adapter`` accepts and the adapters deltaserve writes fit. An
    embedding's or the head's LoRA (vLLM wraps them too) takes factors the other way round, and MoE experts
    stacked ones: neither is written, so those tensors go to the dense path."""
    from deltaserve.server.vllm_compat import BaseLinearLayerWithLoRA

    manager = getattr(getattr(model_runner, "lora_manager", None), "_adapter_manager", None)
    if manager is None:
        return None
    expected: set[str] = set()
    for module in manager.supported_lora_modules:
        expected.update(manager.packed_modules_mapping.get(module, [module]))
    wrapped = {name for name, layer in manager.modules.items() if isinstance(layer, BaseLinearLayerWithLoRA)}
    return sorted(name for name, modules in layout.modules.items()
                  if name.endswith(".weight") and name.rsplit(".", 2)[-2] in expected
                  and modules and all(m in wrapped for m in modules))
