"""HF model helpers the product owns: load a causal LM and its tokenizer, swap weights in and out.

Compression search scores hundreds of candidate task vectors on one resident
model: ``swapped_weights`` loads a (partial) state dict into it and restores
the original tensors bit-exactly afterwards, even on error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def load_causal_lm(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    """An HF causal LM from a local directory, in eval mode (no hub access)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    model.eval()
    return model


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


@contextlib.contextmanager
def swapped_weights(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> Iterator[torch.nn.Module]:
    """Temporarily load ``state_dict`` (a subset of names is fine) into ``model``.

    Tied parameters (e.g. input embeddings shared with the output projection)
    change together, as they do in the served model.
    """
    params = dict(model.state_dict())
    unknown = sorted(set(state_dict) - set(params))
    if unknown:
        raise KeyError(f"state dict has {len(unknown)} names the model lacks, e.g. {unknown[:3]}")
    saved = {name: params[name].detach().clone() for name in state_dict}
    try:
        with torch.no_grad():
            for name, value in state_dict.items():
                if params[name].shape != value.shape:
                    raise ValueError(f"{name}: shape {tuple(value.shape)} does not match model "
                                     f"{tuple(params[name].shape)}")
                params[name].copy_(value)
        yield model
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


@dataclass(frozen=True)
class IndexedDelta:
    """A sparse delta by flat position: ``W.view(-1)[index] += values`` (``index`` int64, unique).

    What an NPS candidate is before it becomes a tensor: :func:`deltas_added` adds it without
    materialising the dense zeros or scanning them for the non-zero entries."""

    index: torch.Tensor
    values: torch.Tensor
    shape: torch.Size

    def to_dense(self) -> torch.Tensor:
        out = torch.zeros(self.shape.numel(), dtype=self.values.dtype)
        out[self.index] = self.values
        return out.view(self.shape)


@contextlib.contextmanager
def deltas_added(model: torch.nn.Module, deltas: Mapping[str, torch.Tensor | IndexedDelta]
                 ) -> Iterator[torch.nn.Module]:
    """Temporarily ``W += delta`` in place, restoring every weight bit-exactly on exit.

    Only a delta's non-zero entries are added and saved (a pruned candidate of NPS touches about k
    entries, not all 135 M weights of SmolLM2); a mostly dense delta is added in one pass. The result
    equals :func:`swapped_weights` with :func:`added_weights` (x + 0 == x); tied parameters (one storage,
    two names) get their delta once. Non-contiguous parameters take that slower path. An
    :class:`IndexedDelta` is added at its positions as they are (no scan for non-zeros)."""
    params = dict(model.state_dict())
    if any(not params.get(n, torch.empty(0)).is_contiguous() for n in deltas) or set(deltas) - set(params):
        dense = {n: d.to_dense() if isinstance(d, IndexedDelta) else d for n, d in deltas.items()}
        with swapped_weights(model, added_weights(model, dense)):   # checks and names errors
            yield model
        return
    touched: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
    seen: set[int] = set()
    try:
        with torch.no_grad():
            for name, delta in deltas.items():
                param = params[name]
                if param.data_ptr() in seen:
                    continue
                seen.add(param.data_ptr())
                if param.shape != delta.shape:
                    raise ValueError(f"{name}: shape {tuple(delta.shape)} does not match model {tuple(param.shape)}")
                flat = param.view(-1)
                if isinstance(delta, IndexedDelta):
                    if delta.index.numel():
                        touched.append((flat, delta.index, flat[delta.index].clone()))
                        flat[delta.index] = (flat[delta.index].float() + delta.values.float()).to(flat.dtype)
                    continue
                values = delta.reshape(-1)
                index = values.nonzero().squeeze(1)
                if index.numel() > flat.numel() // 8:     # dense: one pass beats gathering by index
                    touched.append((flat, None, flat.clone()))
                    flat.copy_((flat.float() + values.float()).to(flat.dtype))
                elif index.numel():
                    touched.append((flat, index, flat[index].clone()))
                    flat[index] = (flat[index].float() + values[index].float()).to(flat.dtype)
        yield model
    finally:
        with torch.no_grad():
            for flat, index, saved in reversed(touched):
                if index is None:
                    flat.copy_(saved)
                else:
                    flat[index] = saved


def added_weights(model: torch.nn.Module, deltas: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{name: W_model + delta}`` in each parameter's dtype, for :func:`swapped_weights`."""
    params = dict(model.state_dict())
    unknown = sorted(set(deltas) - set(params))
    if unknown:
        raise KeyError(f"deltas name {len(unknown)} parameters the model lacks, e.g. {unknown[:3]}")
    return {name: (params[name].float() + d.float()).to(params[name].dtype) for name, d in deltas.items()}
