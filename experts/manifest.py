"""The expert manifest: what ``manifest.json`` of an expert folder holds, validated (experts.expert).

Derived fields (bytes, bits/param, density, rank, tensors, sha256) are
computed by ``experts.expert.save_expert`` from what it writes, never taken
from the caller; this model checks they are consistent with each other.
"""

from __future__ import annotations

import hashlib
import math
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, field_validator, model_validator

from deltaserve.experts.codecs import CODECS

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "tensors.safetensors"
CARRIED_FILE = "carried.safetensors"
PART_SEPARATOR = "::"
NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
DTypeName = Literal["float32", "float16", "bfloat16", "float64"]
_TORCH_DTYPES: dict[str, torch.dtype] = {n: getattr(torch, n) for n in ("float32", "float16", "bfloat16", "float64")}


class ExpertFormatError(ValueError):
    """An expert folder is missing, malformed or inconsistent (the message names the file)."""


class BaseMismatchError(ExpertFormatError):
    """The expert was made for another base model."""


class TensorSpec(BaseModel):
    """Shape and dtype of the BASE parameter a delta applies to."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    shape: tuple[NonNegativeInt, ...]
    dtype: DTypeName


class CalibrationDetail(BaseModel):
    """How an expert answers its calibration examples (experts.calibration), teacher-forced."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    exact: float = Field(ge=0.0, le=1.0, description="share of examples answered exactly (greedy exact match)")
    token_accuracy: float = Field(ge=0.0, le=1.0, description="share of answer tokens that are the argmax")
    nll: float = Field(ge=0.0, description="mean answer-token negative log-likelihood")
    examples: int = Field(ge=1, description="calibration examples scored")


class ExpertManifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: Literal[1] = Field(description="on-disk format version")
    name: str = Field(pattern=NAME_PATTERN, description="used in URLs and paths")
    base_fingerprint: str = Field(min_length=1, description="fingerprint of the base model")
    kind: Literal["full", "lora"] = Field(description="full fine-tune or LoRA origin")
    codec: str = Field(description="storage codec of every tensor (experts.codecs)")
    density: float | None = Field(ge=0.0, le=1.0, description="kept fraction; None for lowrank/dense")
    rank: int | None = Field(ge=1, description="largest factor rank (lowrank codec), else None")
    bytes: int = Field(ge=0, description="exact bytes of all stored tensor parts")
    carried_bytes: int = Field(ge=0, description="exact bytes of the carried parameters")
    base_params: int = Field(ge=1, description="number of base parameters the expert covers")
    bits_per_param: float = Field(ge=0.0, description="8 * bytes / base_params")
    source: str = Field(description="where the expert came from (path or description)")
    method: dict[str, Any] = Field(description="compressor name and options, e.g. {'name': 'nps', ...}")
    calibration_score: float | None = Field(None, description="the graded calibration score routers compare: exact "
                                                               "match + token accuracy / (examples + 1)")
    calibration: CalibrationDetail | None = Field(None, description="the calibration score's parts")
    task: str | None = None
    created: str = Field(description="ISO 8601 timestamp")
    tensors: dict[str, TensorSpec] = Field(min_length=1)
    carried: list[str] = Field(default_factory=list)
    sha256: dict[str, str] = Field(default_factory=dict, description="file name -> hex digest")

    @property
    def lowrank(self) -> bool:
        """Stored as factors (its codec's ``lowrank`` capability): servable as a LoRA adapter."""
        return CODECS[self.codec].lowrank

    @field_validator("codec")
    @classmethod
    def _known_codec(cls, value: str) -> str:
        if value not in CODECS:
            raise ValueError(f"unknown codec {value!r}; known codecs: {sorted(CODECS)}")
        return value

    @field_validator("created")
    @classmethod
    def _iso_timestamp(cls, value: str) -> str:
        datetime.fromisoformat(value)  # raises ValueError with the bad value
        return value

    @field_validator("method")
    @classmethod
    def _method_has_name(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(value.get("name"), str):
            raise ValueError("method must hold the compressor's 'name' (a string)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ExpertManifest:
        counted = sum(math.prod(spec.shape) for spec in self.tensors.values())
        if counted != self.base_params:
            raise ValueError(f"base_params={self.base_params} but the tensors hold {counted} parameters")
        if not math.isclose(self.bits_per_param, 8 * self.bytes / self.base_params, rel_tol=1e-9):
            raise ValueError(f"bits_per_param={self.bits_per_param} != 8*bytes/base_params")
        if overlap := sorted(set(self.carried) & set(self.tensors)):
            raise ValueError(f"carried parameters also listed as tensors: {overlap}")
        if unknown := sorted(set(self.sha256) - {TENSORS_FILE, CARRIED_FILE}):
            raise ValueError(f"sha256 names unknown files {unknown}")
        return self


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
