"""Turning a registration source into a staged expert folder: how a fine-tune is compressed
(``Compression``), a PEFT LoRA kept exactly as its factors, an expert folder copied, and a staged
expert's calibration score (experts.store publishes what these write).

Registration sources: an already-compressed expert folder (``manifest.json``), a PEFT LoRA adapter
(``adapter_config.json``: kept exactly as its factors, lowrank codec, unless a compression is given) or
a full fine-tuned HF model (``config.json``: its task vector compressed with the given method).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, cast

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from deltaserve.experts.codecs import FactorCodec, get_codec
from deltaserve.experts.expert import load_expert
from deltaserve.experts.manifest import MANIFEST_FILE, BaseMismatchError, ExpertManifest
from deltaserve.experts.save import EncodedDelta, save_expert
from deltaserve.experts.taskvector import lora_factors

Writer = Callable[[Path], object]   # writes an expert folder at the given (staging) path


class SourceError(ValueError):
    """A registration source is not something the store can import; the message says why."""


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
    """Measure a staged expert on the calibration examples: ``objective(decoded deltas)`` is its calibration
    score (kept as is when the compressor already scored it), and an objective that reports the score's parts
    (``evaluate``, experts.calibration) records them too."""
    manifest_path = stage / MANIFEST_FILE
    raw = json.loads(manifest_path.read_text())
    deltas = dict(load_expert(stage).iter_deltas(torch.float32))
    evaluate = getattr(objective, "evaluate", None)
    score = evaluate(deltas) if evaluate is not None else None
    if score is not None:
        raw["calibration"] = {"exact": score.exact, "token_accuracy": score.token_accuracy, "nll": score.nll,
                              "examples": score.n}
    if raw.get("calibration_score") is None:
        raw["calibration_score"] = float(score.graded if score is not None else objective(deltas))
    manifest_path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def save_lora_expert(base_dir: Path, adapter_dir: Path, out: Path, *, name: str, fingerprint: str) -> ExpertManifest:
    """A PEFT LoRA kept exactly: per adapted weight, A and scaling*B (lowrank codec, adapter dtype)."""
    factors, carried = lora_factors(base_dir, adapter_dir)
    codec = cast(FactorCodec, get_codec("lowrank"))
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


def source_kind(path: Path) -> str:
    """'expert', 'lora' or 'full', from the marker files of a directory."""
    path = Path(path)
    if not path.is_dir():
        raise SourceError(f"{path} is not a directory")
    if (path / MANIFEST_FILE).is_file():
        return "expert"
    if (path / "adapter_config.json").is_file():
        return "lora"
    if (path / "config.json").is_file():
        return "full"
    raise SourceError(f"{path} is neither an expert folder (manifest.json), a PEFT adapter "
                     "(adapter_config.json) nor an HF model (config.json)")


def source_writer(base_dir: Path, fingerprint: str, name: str, source: Path, compression: Compression | None,
                  objective: Any = None, trainer: Any = None) -> Writer:
    """What writes ``source`` as expert ``name`` into a staging folder (experts.store.ExpertStore.publish)."""
    kind = source_kind(source)
    if kind == "expert":
        if compression is not None:
            raise SourceError("an already-compressed expert folder is stored as is; drop `compression`")
        return lambda stage: _copy_expert(source, stage, name)
    if kind == "lora" and compression is None:
        return lambda stage: save_lora_expert(base_dir, source, stage, name=name, fingerprint=fingerprint)
    from deltaserve.experts.compress import compress_expert, extract

    comp = compression or Compression()
    tv = extract(base_dir, source if kind == "full" else None, source if kind == "lora" else None)
    if tv.base_fingerprint != fingerprint:
        raise BaseMismatchError(f"{source} was not made from this store's base")
    return lambda stage: compress_expert(tv, stage, name=name, method=comp.method, options=comp.options,
                                         objective=objective, trainer=trainer, task=comp.task,
                                         value_dtype=comp.torch_dtype, progress=False)


def _copy_expert(source: Path, stage: Path, name: str) -> None:
    manifest = load_expert(source).manifest  # header check before copying anything
    shutil.copytree(source, stage)
    if manifest.name != name:  # the store's name wins: rewrite the manifest's name field
        raw = json.loads((stage / MANIFEST_FILE).read_text())
        raw["name"] = name
        (stage / MANIFEST_FILE).write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


class MissingExamples(ValueError):
    """A compression method needs examples that were not given; ``param`` is which (calibration, training)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def compression_helpers(base_dir: Path, method: str | None, options: Any, calibration: Any = None,
                        training: Any = None) -> tuple[Any, Any]:
    """What a registration needs besides the task vector, from chat examples (experts.examples):
    the calibration objective (NPS's search; and, given calibration examples with any method, the measured
    quality stored as the expert's calibration score) and sparse_ft's trainer. ``MissingExamples`` names
    what a method needs and was not given. The CLI and the HTTP API both call this."""
    from deltaserve.experts.compress import COMPRESSORS, get_compressor

    needs = get_compressor(method).needs if method is not None else ()
    objective = trainer = None
    if calibration is None and "objective" in needs:
        raise MissingExamples(f"{method} scores candidates on calibration examples", "calibration")
    if calibration is not None:
        from deltaserve.experts.calibration import delta_objective

        objective = delta_objective(base_dir, calibration)
    if method is not None and "trainer" in needs:   # (needs is empty without a method)
        if training is None:
            raise MissingExamples(f"{method} re-trains the kept entries on training examples", "training")
        from deltaserve.experts.finetune import masked_trainer

        trainer = masked_trainer(base_dir, training, COMPRESSORS.parse_options(method, options or {}))
    return objective, trainer
