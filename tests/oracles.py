"""Shared helpers for the tensor-math tests: seeded inputs, tolerances, PEFT's merge_utils."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

DTYPES = [torch.float32, torch.float64]
# Relative tolerance per dtype for results that should agree up to rounding.
RTOL = {torch.float32: 1e-6, torch.float64: 1e-12}
SHAPE = (16, 24)


def load_peft_merge_utils():
    """PEFT's merge_utils module, loaded from its file (importing `peft` costs ~5 s)."""
    spec = importlib.util.find_spec("peft")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("peft is not installed; `make install` installs it")
    path = Path(spec.submodule_search_locations[0]) / "utils" / "merge_utils.py"
    module_spec = importlib.util.spec_from_file_location("peft_merge_utils_oracle", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


peft_mu = load_peft_merge_utils()


def make_tau(dtype: torch.dtype, seed: int = 0, shape=SHAPE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """||actual - expected|| <= RTOL[dtype] * ||expected||, same dtype/shape, all finite."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    error = float(torch.linalg.vector_norm((actual - expected).double()))
    scale = float(torch.linalg.vector_norm(expected.double()))
    assert error <= RTOL[dtype] * max(scale, 1e-30), (error, scale)
