"""Compress a task vector into an expert directory: one registered compressor per method.

A compressor is ``fn(deltas, options, context) -> Compressed``: it maps
``{param: tau}`` to ``{param: compressed delta}`` (dense tensors, mostly zeros
or ternary, or low-rank factors) given its typed options (a pydantic model
registered with it, with bounds) and a :class:`CompressionContext` carrying what
some methods need besides tau: NPS a calibration objective, ``sparse_ft`` a
trainer. Register with ``@compressor(name, codec=..., options=Model)``; the CLI
flags, the HTTP ``compression`` body and ``deltaserve methods`` come from the
registry. ``compress_expert`` wires extraction (experts.taskvector),
compression and the on-disk format (experts.expert) together.

A sparse method's output is stored with the smaller sparse codec at the density
it kept (``storage_codec``: Elias-Fano positions below ~25 %, a bitmask above).
Parameters that the fine-tune did not change (tau all zero, e.g. the
embeddings of a fine-tune that only trained the projections) are left out of
the expert, so a swap on the dense path rewrites only what the expert changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from pydantic import Field
from torch import Tensor

from deltaserve.experts import signs, sparsify
from deltaserve.experts.lowrank import lowrank
from deltaserve.experts.manifest import ExpertManifest
from deltaserve.experts.nps import Objective, nps_search
from deltaserve.experts.nps_bands import nps_pruner
from deltaserve.experts.options import Density, Gamma, Seed, Values
from deltaserve.experts.registry import NoOptions, Options, Registry
from deltaserve.experts.save import EncodedDelta, save_expert
from deltaserve.experts.taskvector import TaskVector, extract_full, extract_lora

Trainer = Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]]  # masks -> re-trained deltas (sparse_ft)


@dataclass(frozen=True)
class Compressed:
    deltas: dict[str, Tensor | EncodedDelta]
    method: dict[str, Any]
    calibration_score: float | None = None


@dataclass(frozen=True)
class CompressionContext:
    """What a compressor may need besides tau: ``objective`` (NPS), ``trainer`` (sparse_ft)."""

    objective: Objective | None = None
    trainer: Trainer | None = None
    value_dtype: torch.dtype = torch.float16
    progress: bool = True


@dataclass(frozen=True)
class Compressor:
    name: str
    codec: str
    fn: Callable[[Mapping[str, Tensor], Any, CompressionContext], Compressed]
    needs: tuple[str, ...] = field(default=())

    @property
    def doc(self) -> str:
        return self.fn.__doc__ or ""


COMPRESSORS: Registry[Compressor] = Registry("compression method")


def compressor(name: str, codec: str, options: type[Options] = NoOptions, needs: tuple[str, ...] = ()):
    """Register ``fn(deltas, options, context) -> Compressed`` under ``name``."""

    def register(fn):
        COMPRESSORS.add(name, Compressor(name, codec, fn, needs), options)
        return fn

    return register


def get_compressor(name: str) -> Compressor:
    return COMPRESSORS[name]


# ------------------------------------------------------------------------ options


class SparseOptions(Options):
    density: Density = 0.05


class SupportOptions(SparseOptions):   # a sparse support whose kept values are exact or ±scale
    values: Values = "exact"


class DareOptions(SupportOptions):
    seed: Seed = 0


class BreadcrumbsOptions(SupportOptions):
    gamma: Gamma = 0.01


class LowRankOptions(Options):
    rank: int = Field(8, ge=1, le=4096, description="rank of each matrix's truncated SVD")


class NpsOptions(SupportOptions):
    bands: int = Field(8, ge=1, le=64, description="magnitude bands, one searched weight each")
    generations: int = Field(20, ge=1, le=1000, description="CMA-ES generations at most")
    patience: int | None = Field(8, ge=1, le=1000, description="stop after this many generations without a better "
                                                             "candidate (None: run every generation)")
    population: int | None = Field(None, ge=2, le=1000, description="CMA-ES population (None: pycma's 4 + 3 ln M)")
    banding: Literal["global", "per-tensor"] = Field("global", description="rank and prune over all tensors "
                                                                          "or within each")
    max_weight: float = Field(4.0, ge=1.0, le=1000.0, description="upper bound of every band weight")
    sigma0: float = Field(0.5, gt=0.0, le=10.0, description="CMA-ES initial step size")
    seed: Seed = 0


class SparseFtOptions(SparseOptions):
    steps: int = Field(400, ge=1, le=100_000, description="re-training steps")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="re-training learning rate")
    batch_size: int = Field(32, ge=1, le=4096, description="re-training batch size")
    seed: Seed = 0


# --------------------------------------------------------------------- the methods


def _per_tensor(deltas: Mapping[str, Tensor], fn: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    return {name: fn(t) for name, t in deltas.items()}



@compressor("dense", codec="dense")
def _dense(deltas, options: NoOptions, context: CompressionContext) -> Compressed:
    """The whole task vector (fp16 by default): the reference."""
    return Compressed(dict(deltas), {"name": "dense"})


@compressor("magnitude", codec="sparse", options=SupportOptions)
def _magnitude(deltas, options: SupportOptions, context: CompressionContext) -> Compressed:
    """Top-density entries of each tensor by |tau| (= TIES's trim step)."""
    out = _per_tensor(deltas, lambda t: sparsify.magnitude(t, options.density))
    method = {"name": "magnitude", "density": options.density, **({"values": "sign"} if options.values == "sign"
                                                                    else {})}
    return Compressed(signs.with_values(out, options.values), method)


@compressor("dare", codec="sparse", options=DareOptions)
def _dare(deltas, options: DareOptions, context: CompressionContext) -> Compressed:
    """Random drop with probability 1 - density, kept entries rescaled by 1/density."""
    gen = torch.Generator().manual_seed(options.seed)
    out = _per_tensor(deltas, lambda t: sparsify.dare(t, options.density, gen))
    return Compressed(signs.with_values(out, options.values), {"name": "dare", **options.model_dump()})


@compressor("breadcrumbs", codec="sparse", options=BreadcrumbsOptions)
def _breadcrumbs(deltas, options: BreadcrumbsOptions, context: CompressionContext) -> Compressed:
    """Magnitude band without the largest outliers (Model Breadcrumbs)."""
    out = _per_tensor(deltas, lambda t: sparsify.breadcrumbs(t, options.density, options.gamma))
    return Compressed(signs.with_values(out, options.values), {"name": "breadcrumbs", **options.model_dump()})


@compressor("tswitch", codec="ternary", options=SparseOptions)
def _tswitch(deltas, options: SparseOptions, context: CompressionContext) -> Compressed:
    """T-Switch: top-density mask, signs, one scale per tensor (ternary)."""
    out = _per_tensor(deltas, lambda t: signs.ternary_dense(signs.ternary(t, options.density), dtype=t.dtype))
    return Compressed(out, {"name": "tswitch", "density": options.density})


@compressor("bitdelta", codec="sign")
def _bitdelta(deltas, options: NoOptions, context: CompressionContext) -> Compressed:
    """BitDelta: sign(tau) times one scale per tensor (mean |tau|), ~1 bit per changed parameter."""
    return Compressed(_per_tensor(deltas, signs.bitdelta), {"name": "bitdelta"})


@compressor("lowrank", codec="lowrank", options=LowRankOptions)
def _lowrank(deltas, options: LowRankOptions, context: CompressionContext) -> Compressed:
    """Truncated SVD of every matrix; 1-D deltas (norm weights) are dropped (recorded)."""
    from deltaserve.experts.codecs import FactorCodec, get_codec

    codec = cast(FactorCodec, get_codec("lowrank"))
    out: dict[str, Tensor | EncodedDelta] = {}
    dropped = []
    for name, t in deltas.items():
        if t.dim() != 2:
            dropped.append(name)
            continue
        a, b = lowrank(t.float(), rank=min(options.rank, *t.shape))
        out[name] = EncodedDelta(codec.encode_factors(a, b, value_dtype=context.value_dtype), tuple(t.shape), t.dtype)
    return Compressed(out, {"name": "lowrank", "rank": options.rank, "dropped_1d": dropped})


@compressor("nps", codec="sparse", options=NpsOptions, needs=("objective",))
def _nps(deltas, options: NpsOptions, context: CompressionContext) -> Compressed:
    """Neural Parameter Search: magnitude bands reweighted by CMA-ES on a calibration objective."""
    if context.objective is None:
        raise ValueError("nps needs a calibration objective: calibration examples (a JSONL file of chat examples)")
    per_tensor = options.banding == "per-tensor"
    support = nps_pruner(deltas, options.bands, options.density, per_tensor)

    def prune(weights: list[float]) -> dict[str, Tensor]:   # the stored expert is what was scored
        return signs.with_values(support(weights), options.values)
    result = nps_search(deltas, context.objective, density=options.density, seed=options.seed,
                        progress=context.progress, pruner=prune, bands=options.bands,
                        generations=options.generations, patience=options.patience, population=options.population,
                        per_tensor=per_tensor, max_weight=options.max_weight, sigma0=options.sigma0)
    pruned = prune(list(result.weights))
    method = {"name": "nps", **options.model_dump(), "weights": list(result.weights),
              "objective": getattr(context.objective, "name", "custom"), "baseline_score": result.baseline_score,
              "history": result.history, "evaluations": result.evaluations, "stop_reason": result.stop_reason,
              "search_seconds": round(result.seconds, 2)}
    return Compressed(pruned, method, result.score)


@compressor("sparse_ft", codec="sparse", options=SparseFtOptions, needs=("trainer",))
def _sparse_ft(deltas, options: SparseFtOptions, context: CompressionContext) -> Compressed:
    """Magnitude support, values re-trained on the task (fine-tune with only those entries free)."""
    if context.trainer is None:
        raise ValueError("sparse_ft re-trains the kept entries, so it needs the task's training data "
                         "(a JSONL file of chat examples)")
    masks = {name: sparsify.magnitude_mask(t, options.density) for name, t in deltas.items()}
    trained = context.trainer(masks)
    wrong = sorted(n for n in masks if n not in trained or tuple(trained[n].shape) != tuple(masks[n].shape))
    if wrong:
        raise ValueError(f"the sparse_ft trainer returned no delta of the right shape for {wrong[:3]}")
    out = {name: trained[name].to(deltas[name].dtype) * mask.to(deltas[name].dtype) for name, mask in masks.items()}
    return Compressed(out, {"name": "sparse_ft", **options.model_dump()})


# ------------------------------------------------------------------------ publishing


def storage_codec(comp: Compressor, result: Compressed) -> str:
    """The codec an expert is stored with. The sparse methods' output goes to whichever sparse codec
    is smaller at the density they actually kept: Elias-Fano coded positions (``sparse_ef``, bytes
    falling with density) below about 25 %, the bitmask (``sparse``) above; sign-valued output
    (``values="sign"``) to ``sign_ef``."""
    if comp.codec != "sparse":
        return comp.codec
    if result.method.get("values") == "sign":
        return "sign_ef"
    from deltaserve.experts.codecs.sparse_ef import sparse_codec_for

    tensors = [d for d in result.deltas.values() if isinstance(d, Tensor)]
    total = sum(t.numel() for t in tensors)
    kept = sum(int(torch.count_nonzero(t)) for t in tensors)
    return sparse_codec_for(kept / total) if total else comp.codec


def extract(base_dir: Path, finetuned_dir: Path | None = None, adapter_dir: Path | None = None) -> TaskVector:
    if finetuned_dir is not None and adapter_dir is None:
        return extract_full(base_dir, finetuned_dir)
    if adapter_dir is not None and finetuned_dir is None:
        return extract_lora(base_dir, adapter_dir)
    raise ValueError("give exactly one of a fine-tuned model directory or a PEFT adapter directory")


def compress_expert(
    tv: TaskVector,
    out: Path,
    *,
    name: str,
    method: str,
    options: Mapping[str, Any] | Options | None = None,
    objective: Objective | None = None,
    trainer: Trainer | None = None,
    task: str | None = None,
    value_dtype: torch.dtype = torch.float16,
    progress: bool = True,
    **option_kwargs: Any,
) -> ExpertManifest:
    """Compress ``tv`` with ``method`` and publish it as expert ``name`` at ``out``.

    ``options`` (or keyword arguments) are checked against the method's options
    model: an unknown option raises with the valid ones listed.
    """
    comp = get_compressor(method)
    checked = COMPRESSORS.parse_options(method, {**dict(options or {}), **option_kwargs}
                                        if not isinstance(options, Options) else options)
    changed = {n: t for n, t in tv.deltas.items() if torch.count_nonzero(t)}
    if not changed:
        raise ValueError(f"{tv.source}: the task vector is zero everywhere (the model equals the base)")
    context = CompressionContext(objective, trainer, value_dtype, progress)
    result = comp.fn(changed, checked, context)
    return save_expert(
        out, result.deltas, name=name, base_fingerprint=tv.base_fingerprint, codec=storage_codec(comp, result),
        source=tv.source, method=result.method, kind=tv.kind, value_dtype=value_dtype,
        carried=tv.carried, calibration_score=result.calibration_score, task=task,
    )

