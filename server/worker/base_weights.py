"""The base's weights as the worker reads them: straight from its safetensors files, on demand.

Every recipe is computed from the base, so the worker needs base tensors — but only the ones a swap
touches, and only while it computes them. ``BaseWeights`` knows which file holds which tensor and maps
it when asked: the tensor is a view of the memory-mapped file, mapped while the tensor lives, so a
process holds no copy of the base between swaps, and the pages the kernel caches for the files are
shared by every process (every rank of a tensor-parallel engine). The views are copy-on-write: clone
one before writing into it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from deltaserve.experts.expert import SAFETENSORS_DTYPES


class BaseWeights(Mapping[str, Tensor]):
    def __init__(self, base_dir: Path) -> None:
        self._where: dict[str, str] = {}
        self._specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for path in sorted(Path(base_dir).glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():
                    self._where[key] = str(path)
                    sl = fh.get_slice(key)
                    self._specs[key] = (tuple(sl.get_shape()), SAFETENSORS_DTYPES[sl.get_dtype()])
        if not self._where:
            raise FileNotFoundError(f"no *.safetensors weights in {base_dir}")

    def __getitem__(self, name: str) -> Tensor:
        with safe_open(self._where[name], framework="pt") as fh:
            return fh.get_tensor(name)

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of ``name``, from the file's header (nothing read)."""
        return self._specs[name]

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

