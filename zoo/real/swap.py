"""vLLM worker extension: load a whole HF checkpoint's weights into the running engine.

The matrix scores every expert in one engine: between experts the engine's
weights are replaced by the expert's checkpoint (a full fine-tune), or by the
base with a PEFT LoRA merged in (W + s·B·A, ``experts.taskvector.extract_lora``), through
``model_runner.reload_weights`` (the model's own loader: name mapping, q/k/v and
gate/up fusion, the CPU backend's repacking). Every tensor of the checkpoint is
reloaded, so fused modules are always reloaded whole. vLLM imports this module
inside its worker process (``worker_extension_cls``), so it stays light.
"""

from __future__ import annotations

import logging
from pathlib import Path

from safetensors import safe_open

EXTENSION = "deltaserve_zoo.real.swap.CheckpointSwapExtension"


def checkpoint_tensors(model_dir: Path):
    """(name, tensor) for every tensor in the directory's ``*.safetensors`` files."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():
                yield name, fh.get_tensor(name)


class _WeightlessLayers(logging.Filter):
    """vLLM warns "<Layer>: Failed to load weights" on every reload for layers the checkpoint has no tensor of
    (the rotary embedding, the head tied to the embeddings): nothing is missing, the lines are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Failed to load weights" not in record.getMessage()


_QUIET = _WeightlessLayers()


def _quiet_reloads() -> None:
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_QUIET)   # once: same object


class CheckpointSwapExtension:
    """Methods vLLM mixes into its Worker; call with ``llm.collective_rpc("realsuite_load", ...)``."""

    def realsuite_load(self, model_dir: str) -> int:
        """Replace all weights by the checkpoint in ``model_dir``; returns the tensor count.

        Loaded LoRA adapters are dropped by vLLM here; the prefix cache must be reset by the caller.
        """
        _quiet_reloads()
        items = list(checkpoint_tensors(Path(model_dir)))
        self.model_runner.reload_weights(weights_iterator=iter(items))
        return len(items)

    def realsuite_load_lora(self, base_dir: str, adapter_dir: str) -> int:
        """Replace all weights by the base's with the LoRA in ``adapter_dir`` merged in; returns the
        count of merged tensors. Same caveats as ``realsuite_load``."""
        from deltaserve.experts.taskvector import extract_lora

        _quiet_reloads()
        tau = extract_lora(Path(base_dir), Path(adapter_dir))
        items = []
        for name, tensor in checkpoint_tensors(Path(base_dir)):
            delta = tau.deltas.get(name)
            merged = tensor if delta is None else tensor + delta.to(tensor.dtype)
            items.append((name, tau.carried.get(name, merged)))   # modules_to_save replace the base's
        self.model_runner.reload_weights(weights_iterator=iter(items))
        return len(tau.deltas)
