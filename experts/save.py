"""Writing an expert: encode each delta with the expert's codec, derive the manifest from what is
written (bytes, bits/param, density, rank, tensors, sha256 — never taken from the caller), publish the
folder atomically. The layout is described in experts.expert."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import Tensor

from deltaserve.experts.atomic import atomic_dir
from deltaserve.experts.codecs import Codec, get_codec
from deltaserve.experts.manifest import (_TORCH_DTYPES, CARRIED_FILE, FORMAT_VERSION, MANIFEST_FILE, NAME_PATTERN,
                                         PART_SEPARATOR, TENSORS_FILE, ExpertManifest, sha256_file)


@dataclass(frozen=True)
class EncodedDelta:
    """Parts already encoded by the expert's codec (e.g. ``encode_factors``) plus the base spec."""

    parts: Mapping[str, Tensor]
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32


def save_expert(
    directory: Path,
    deltas: Mapping[str, Tensor | EncodedDelta],
    *,
    name: str,
    base_fingerprint: str,
    codec: str,
    source: str,
    method: Mapping[str, Any],
    kind: Literal["full", "lora"] = "full",
    value_dtype: torch.dtype = torch.float16,
    encode_options: Mapping[str, Any] | None = None,
    carried: Mapping[str, Tensor] | None = None,
    calibration_score: float | None = None,
    task: str | None = None,
    created: str | None = None,
) -> ExpertManifest:
    """Encode ``deltas`` (param -> compressed dense delta, or EncodedDelta) and publish atomically.

    A dense tensor's base spec is its own shape and dtype. ``encode_options``
    go to ``codec.encode`` (e.g. ``{"rank": 8}`` for lowrank). An existing
    expert at ``directory`` is replaced wholly. Returns the written manifest.
    """
    if not re.fullmatch(NAME_PATTERN, name):
        raise ValueError(f"name {name!r} must match {NAME_PATTERN} (it is used in URLs and paths)")
    codec_impl = get_codec(codec)
    encoded = {param: _encode(codec_impl, param, delta, value_dtype, encode_options or {})
               for param, delta in deltas.items()}
    carried = dict(carried or {})
    draft = ExpertManifest(**_derived_fields(codec_impl, encoded, carried), name=name,
                           base_fingerprint=base_fingerprint, kind=kind, codec=codec, source=source,
                           method=dict(method), calibration_score=calibration_score, task=task,
                           created=created or datetime.now(UTC).isoformat(timespec="seconds"))
    with atomic_dir(Path(directory)) as tmp:
        flat = {f"{p}{PART_SEPARATOR}{k}": t.contiguous() for p, d in encoded.items() for k, t in d.parts.items()}
        save_file(flat, str(tmp / TENSORS_FILE), metadata={"format": "pt"})
        digests = {TENSORS_FILE: sha256_file(tmp / TENSORS_FILE)}
        if carried:
            save_file({k: v.contiguous() for k, v in carried.items()}, str(tmp / CARRIED_FILE),
                      metadata={"format": "pt"})
            digests[CARRIED_FILE] = sha256_file(tmp / CARRIED_FILE)
        manifest = ExpertManifest.model_validate({**draft.model_dump(), "sha256": digests})
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")
    return manifest


def _encode(codec: Codec, param: str, delta: Tensor | EncodedDelta, value_dtype: torch.dtype,
            options: Mapping[str, Any]) -> EncodedDelta:
    if PART_SEPARATOR in param or not param:
        raise ValueError(f"parameter name {param!r} must be non-empty and must not contain {PART_SEPARATOR!r}")
    try:
        if isinstance(delta, Tensor):
            if delta.dtype not in _TORCH_DTYPES.values():
                raise ValueError(f"dtype {delta.dtype} is not one of {sorted(_TORCH_DTYPES)}")
            parts = codec.encode(delta, value_dtype=value_dtype, **options)
            return EncodedDelta(parts, tuple(delta.shape), delta.dtype)
        if delta.dtype not in _TORCH_DTYPES.values():
            raise ValueError(f"base dtype {delta.dtype} is not one of {sorted(_TORCH_DTYPES)}")
        parts = dict(delta.parts)
        problems = codec.check_parts({k: (tuple(v.shape), v.dtype) for k, v in parts.items()}, delta.shape)
        if problems:
            raise ValueError("; ".join(problems))
        if not all(torch.isfinite(t).all() for t in parts.values() if t.is_floating_point()):
            raise ValueError("parts hold NaN or Inf")
        if not codec.lowrank:   # factors are whole once check_parts passed their shapes
            codec.decode(parts, delta.shape, torch.float32)  # full consistency check (mask counts etc.)
        return EncodedDelta(parts, tuple(delta.shape), delta.dtype)
    except ValueError as err:
        raise ValueError(f"delta for parameter {param!r} ({codec.name} codec): {err}") from err


def _derived_fields(codec: Codec, encoded: Mapping[str, EncodedDelta], carried: Mapping[str, Tensor]) -> dict:
    if not encoded:
        raise ValueError("deltas is empty: an expert needs at least one parameter")
    base_params = sum(math.prod(d.shape) for d in encoded.values())
    stored_bytes = sum(codec.nbytes(d.parts) for d in encoded.values())
    kept = [codec.kept_count(d.parts) for d in encoded.values()]
    ranks = [r for d in encoded.values() if (r := codec.rank(d.parts)) is not None]
    return {
        "format_version": FORMAT_VERSION,
        "density": None if None in kept else sum(k for k in kept if k is not None) / base_params,
        "rank": max(ranks) if ranks else None,
        "bytes": stored_bytes,
        "carried_bytes": sum(t.numel() * t.element_size() for t in carried.values()),
        "base_params": base_params,
        "bits_per_param": 8 * stored_bytes / base_params,
        "tensors": {p: {"shape": list(d.shape), "dtype": str(d.dtype).removeprefix("torch.")}
                    for p, d in encoded.items()},
        "carried": sorted(carried),
    }
