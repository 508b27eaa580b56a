"""What a real-suite build makes: one validated, hashable spec.

Every number that changes a trained weight or a matrix cell is here. An
artifact's cache key hashes the part of the spec it depends on plus its
parent's key, so changing the LoRA learning rate rebuilds only the LoRAs and
the matrix. Hyper-parameters were chosen on the calib split with
``python -m zoo.real.tune`` (teacher-forced exact match, never the test split);
its table is in the comments below.
"""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field

# Bump when training, conversion or skill-generation code changes in a way that changes weights.
REAL_SUITE_VERSION = 1

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TrainSpec(_Frozen):
    """One supervised fine-tune: ``steps`` AdamW steps of ``batch_size`` distinct train examples."""

    steps: int = Field(ge=1, le=2000, description="optimizer steps")
    batch_size: int = Field(8, ge=1, le=256, description="sequences per step")
    lr: float = Field(gt=0, le=1e-1, description="peak learning rate (warm-up, cosine to 10 %)")

    @property
    def train_examples(self) -> int:
        """One pass over distinct examples: every step sees new payloads."""
        return self.steps * self.batch_size


class LoraTrainSpec(TrainSpec):
    rank: int = Field(8, ge=1, le=64, description="LoRA rank r")
    alpha: int = Field(16, ge=1, description="LoRA alpha (scale alpha / r)")
    target_modules: tuple[str, ...] = LORA_TARGETS


class RealSuiteSpec(_Frozen):
    seed: int = 0
    skills: tuple[str, ...] = ("iso_date", "unit_convert", "json_extract", "sentiment", "sql", "snake_case")
    # Chosen with `python -m zoo.real.tune` on 64 calib prompts per skill (teacher-forced exact
    # match, exemplar / held-out phrasings), batch 8, one pass over distinct train examples:
    #   full, 20 steps, lr 3e-5: min 89.1 % (unit_convert, sentiment; sentiment held-out 57.8 %)
    #   full, 20 steps, lr 1e-4: unit_convert 70.3 %, the rest >= 93.8 %
    #   full, 30 steps, lr 5e-5: min 93.8 % (iso_date, unit_convert), held-out >= 90.6 %   <- chosen
    #   LoRA r8, 30 steps, lr 1e-3: min 92.2 % (iso_date), held-out >= 87.5 %               <- chosen
    #   LoRA r8, 30 steps, lr 3e-3: sentiment diverged (26.6 %), unit_convert 82.8 %
    # time_24h (in the catalog, not in the suite) reached only 21.9 % at 20 steps: the PM -> +12
    # arithmetic does not train in this budget, so snake_case took its place.
    full: TrainSpec = TrainSpec(steps=30, lr=5e-5)
    lora: LoraTrainSpec = LoraTrainSpec(steps=30, lr=1e-3)
    eval_examples: int = Field(64, ge=8, le=1000, description="test prompts per skill in the matrix")
    max_model_len: int = Field(512, ge=128, description="vLLM context for the matrix")

    def key(self, *parts: str) -> str:
        """Cache key of an artifact that depends on the named fields of this spec."""
        data = self.model_dump(mode="json")
        blob = json.dumps([REAL_SUITE_VERSION, self.seed, {p: data[p] for p in parts}], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
