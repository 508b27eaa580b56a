"""Compress a task vector into an expert directory: one registered compressor per method.

A compressor maps ``{param: tau}`` to ``{param: compressed delta}`` (dense
tensors, mostly zeros / ternary / low-rank factors) and names the codec that
stores its output. ``compress_expert`` wires extraction (experts.taskvector),
compression, and the on-disk format (experts.expert) together; the CLI and
the quality benchmarks call it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from experts import sparsify
from experts.expert import EncodedDelta, ExpertManifest, save_expert
from experts.nps import Objective, band_ids, nps_prune, nps_search
from experts.registry import Registry
from experts.taskvector import TaskVector, extract_full, extract_lora


@dataclass(frozen=True)
class Compressed:
    deltas: dict[str, Tensor | EncodedDelta]
    method: dict[str, Any]
    calibration_score: float | None = None


@dataclass(frozen=True)
class Compressor:
    name: str
    codec: str
    fn: Callable[..., Compressed]


COMPRESSORS: Registry[Compressor] = Registry("compression method")
Trainer = Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]]  # masks -> re-trained deltas (sparse_ft)


def compressor(name: str, codec: str):
    """Register ``fn(deltas, *, density, rank, seed, objective, value_dtype) -> Compressed``."""

    def register(fn: Callable[..., Compressed]):
        COMPRESSORS.add(name, Compressor(name, codec, fn))
        return fn

    return register


def get_compressor(name: str) -> Compressor:
    return COMPRESSORS[name]


def _per_tensor(deltas: Mapping[str, Tensor], fn: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    return {name: fn(t) for name, t in deltas.items()}


@compressor("dense", codec="dense")
def _dense(deltas, **_: Any) -> Compressed:
    return Compressed(dict(deltas), {"name": "dense"})


@compressor("magnitude", codec="sparse")
def _magnitude(deltas, *, density: float, **_: Any) -> Compressed:
    return Compressed(_per_tensor(deltas, lambda t: sparsify.magnitude(t, density)), {"name": "magnitude", "density": density})


@compressor("ties", codec="sparse")
def _ties(deltas, *, density: float, **_: Any) -> Compressed:
    return Compressed(_per_tensor(deltas, lambda t: sparsify.ties_trim(t, density)), {"name": "ties", "density": density})


@compressor("dare", codec="sparse")
def _dare(deltas, *, density: float, seed: int, **_: Any) -> Compressed:
    gen = torch.Generator().manual_seed(seed)
    out = _per_tensor(deltas, lambda t: sparsify.dare(t, density, gen))
    return Compressed(out, {"name": "dare", "density": density, "seed": seed})


@compressor("breadcrumbs", codec="sparse")
def _breadcrumbs(deltas, *, density: float, gamma: float = 0.01, **_: Any) -> Compressed:
    out = _per_tensor(deltas, lambda t: sparsify.breadcrumbs(t, density, gamma))
    return Compressed(out, {"name": "breadcrumbs", "density": density, "gamma": gamma})


@compressor("tswitch", codec="ternary")
def _tswitch(deltas, *, density: float, **_: Any) -> Compressed:
    out = _per_tensor(deltas, lambda t: sparsify.ternary_dense(sparsify.ternary(t, density), dtype=t.dtype))
    return Compressed(out, {"name": "tswitch", "density": density})


@compressor("lowrank", codec="lowrank")
def _lowrank(deltas, *, rank: int, value_dtype: torch.dtype = torch.float16, **_: Any) -> Compressed:
    """Truncated SVD of every matrix; 1-D deltas (norm weights) are dropped (recorded)."""
    from experts.codecs import get_codec

    codec = get_codec("lowrank")
    out: dict[str, Tensor | EncodedDelta] = {}
    dropped = []
    for name, t in deltas.items():
        if t.dim() != 2:
            dropped.append(name)
            continue
        a, b = sparsify.lowrank(t.float(), rank=min(rank, *t.shape))
        out[name] = EncodedDelta(codec.encode_factors(a, b, value_dtype=value_dtype), tuple(t.shape), t.dtype)
    return Compressed(out, {"name": "lowrank", "rank": rank, "dropped_1d": dropped})


@compressor("nps", codec="sparse")
def _nps(deltas, *, density: float, seed: int, objective: Objective | None, **options: Any) -> Compressed:
    if objective is None:
        raise ValueError("nps needs a calibration objective (e.g. --task NAME for a zoo task)")
    known = ("bands", "generations", "population", "per_tensor", "max_weight", "sigma0")
    search = {k: options[k] for k in known if options.get(k) is not None}
    result = nps_search(deltas, objective, density=density, seed=seed, **search)
    per_tensor = search.get("per_tensor", False)
    pruned = nps_prune(deltas, band_ids(deltas, len(result.weights), per_tensor), result.weights, density, per_tensor)
    method = {"name": "nps", "density": density, "seed": seed, **search, "weights": list(result.weights),
              "baseline_score": result.baseline_score, "history": result.history,
              "evaluations": result.evaluations, "search_seconds": round(result.seconds, 2)}
    return Compressed(pruned, method, result.score)


@compressor("sparse_ft", codec="sparse")
def _sparse_ft(deltas, *, density: float, trainer: Trainer | None = None, **_: Any) -> Compressed:
    """Keep the top-``density`` support of tau per tensor (as ``magnitude``), then let ``trainer``
    re-fit the values on it: ``trainer(masks) -> deltas`` (fine-tuning from the base with only the
    masked entries trainable). Values outside the support are dropped whatever the trainer returns."""
    if trainer is None:
        raise ValueError("sparse_ft re-trains the kept entries, so it needs the task's training data "
                         "(e.g. --task NAME for a zoo task)")
    masks = {name: sparsify.magnitude_mask(t, density) for name, t in deltas.items()}
    trained = trainer(masks)
    wrong = sorted(n for n in masks if n not in trained or tuple(trained[n].shape) != tuple(masks[n].shape))
    if wrong:
        raise ValueError(f"the sparse_ft trainer returned no delta of the right shape for {wrong[:3]}")
    out = {name: trained[name].to(deltas[name].dtype) * mask.to(deltas[name].dtype) for name, mask in masks.items()}
    return Compressed(out, {"name": "sparse_ft", "density": density})


def extract(base_dir: Path, finetuned_dir: Path | None = None, adapter_dir: Path | None = None) -> TaskVector:
    if (finetuned_dir is None) == (adapter_dir is None):
        raise ValueError("give exactly one of a fine-tuned model directory or a PEFT adapter directory")
    return extract_full(base_dir, finetuned_dir) if finetuned_dir else extract_lora(base_dir, adapter_dir)


def compress_expert(
    tv: TaskVector,
    out: Path,
    *,
    name: str,
    method: str,
    density: float = 0.05,
    rank: int = 8,
    seed: int = 0,
    objective: Objective | None = None,
    task: str | None = None,
    value_dtype: torch.dtype = torch.float16,
    **options: Any,
) -> ExpertManifest:
    """Compress ``tv`` with ``method`` and publish it as expert ``name`` at ``out``."""
    comp = get_compressor(method)
    result = comp.fn(tv.deltas, density=density, rank=rank, seed=seed, objective=objective,
                     value_dtype=value_dtype, **options)
    return save_expert(
        out, result.deltas, name=name, base_fingerprint=tv.base_fingerprint, codec=comp.codec,
        source=tv.source, method=result.method, kind=tv.kind, value_dtype=value_dtype,
        carried=tv.carried, calibration_score=result.calibration_score, task=task,
    )
