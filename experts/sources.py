"""Turning a registration source into a staged expert folder: how a fine-tune is compressed
(``Compression``), a PEFT LoRA kept exactly as its factors, and a staged expert's calibration score
(experts.store publishes what these write)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from deltaserve.experts.codecs import get_codec
from deltaserve.experts.expert import MANIFEST_FILE, EncodedDelta, ExpertManifest, load_expert, save_expert
from deltaserve.experts.taskvector import lora_factors


class Compression(BaseModel):
    """How to turn a full fine-tune (or, optionally, a LoRA) into a stored expert.

    ``method`` is a registered compressor (experts.compress); its options (e.g.
    ``density``, ``rank``, NPS's ``generations``) sit beside it and are checked
    against the method's options model. ``calibration`` / ``training`` point at
    chat examples (experts.examples) for methods that need them (NPS,
    sparse_ft): the caller turns them into an objective / a trainer.
    """

    model_config = ConfigDict(extra="allow", frozen=True)
    method: str = Field("magnitude", description="a compression method (deltaserve methods)")
    value_dtype: Literal["float16", "bfloat16", "float32"] = Field("float16", description="stored value dtype")
    task: str | None = Field(None, max_length=200, description="a label recorded in the manifest")
    calibration: str | list[dict[str, Any]] | None = Field(
        None, description="chat examples NPS scores candidates on: a JSONL path or a list of {messages}")
    training: str | list[dict[str, Any]] | None = Field(
        None, description="chat examples sparse_ft re-trains on: a JSONL path or a list of {messages}")

    @model_validator(mode="after")
    def _method_and_options(self) -> Compression:
        from deltaserve.experts.compress import COMPRESSORS

        COMPRESSORS.parse_options(self.method, self.model_extra or {})
        return self

    @property
    def options(self) -> Any:
        """The method's validated options model."""
        from deltaserve.experts.compress import COMPRESSORS

        return COMPRESSORS.parse_options(self.method, self.model_extra or {})

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.value_dtype)


def score_stage(stage: Path, objective: Any) -> None:
    """Give a staged expert without a calibration score one: ``objective(decoded deltas)``, i.e. its
    measured quality on the calibration examples (kept as is when the compressor already scored it)."""
    manifest_path = stage / MANIFEST_FILE
    raw = json.loads(manifest_path.read_text())
    if raw.get("calibration_score") is not None:
        return
    expert = load_expert(stage)
    raw["calibration_score"] = float(objective(dict(expert.iter_deltas(torch.float32))))
    manifest_path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def save_lora_expert(base_dir: Path, adapter_dir: Path, out: Path, *, name: str, fingerprint: str) -> ExpertManifest:
    """A PEFT LoRA kept exactly: per adapted weight, A and scaling*B (lowrank codec, adapter dtype)."""
    factors, carried = lora_factors(base_dir, adapter_dir)
    codec = get_codec("lowrank")
    dtype = next(iter(factors.values())).A.dtype
    value_dtype = dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    encoded = {}
    for param, f in factors.items():
        B = (f.B.float() * f.scaling).to(value_dtype)
        encoded[param] = EncodedDelta(codec.encode_factors(f.A, B, value_dtype=value_dtype),
                                      (f.B.shape[0], f.A.shape[1]))
    rank = max(f.A.shape[0] for f in factors.values())
    return save_expert(out, encoded, name=name, base_fingerprint=fingerprint, codec="lowrank",
                       source=str(adapter_dir), method={"name": "lora", "rank": rank}, kind="lora",
                       value_dtype=value_dtype, carried=carried)
