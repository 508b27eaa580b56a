"""Train the real suite's experts: a full fine-tune and a PEFT LoRA per skill.

Both go through ``experts.finetune.finetune`` (chat template, loss on the answer
tokens and EOS only) on one pass of distinct train-split examples with the
skill's exemplar phrasings. A run is deterministic for a given seed and thread
count; the builder always trains with one thread per process.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from deltaserve.experts.finetune import answer_matches, finetune
from deltaserve_zoo.real.skills import Split, get_skill
from deltaserve_zoo.real.spec import LoraTrainSpec, TrainSpec


def expert_seed(seed: int, *names: str) -> int:
    digest = hashlib.sha256("/".join([str(seed), *names]).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def load_base(base_dir: Path) -> tuple[Any, Any]:
    """(float32 model in eval mode, tokenizer) from an HF checkpoint directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(base_dir)


def train_examples(skill: str, spec: TrainSpec, seed: int):
    return get_skill(skill).examples("train", spec.train_examples, seed)


def train_full(base_dir: Path, skill: str, spec: TrainSpec, seed: int, progress: bool = True):
    """The base fine-tuned on ``skill`` (every parameter): (model, tokenizer, final loss)."""
    model, tokenizer = load_base(base_dir)
    loss = finetune(model, tokenizer, train_examples(skill, spec, seed), steps=spec.steps,
                    batch_size=spec.batch_size, lr=spec.lr, seed=expert_seed(seed, "full", skill),
                    progress=progress, desc=f"full/{skill}")
    return model, tokenizer, loss


def train_lora(base_dir: Path, skill: str, spec: LoraTrainSpec, seed: int, progress: bool = True):
    """A PEFT LoRA on ``skill`` (adapters only): (peft model, tokenizer, final loss)."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_base(base_dir)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.target_modules),
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    run_seed = expert_seed(seed, "lora", skill)
    torch.manual_seed(run_seed)   # LoRA's A init
    model = get_peft_model(model, config)
    loss = finetune(model, tokenizer, train_examples(skill, spec, seed), steps=spec.steps,
                    batch_size=spec.batch_size, lr=spec.lr, seed=run_seed, progress=progress,
                    desc=f"lora/{skill}")
    return model, tokenizer, loss


def save_full(model: Any, tokenizer: Any, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def save_lora(model: Any, tokenizer: Any, out: Path, base_dir: Path) -> None:
    model.peft_config["default"].base_model_name_or_path = str(Path(base_dir).resolve())
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def calib_accuracy(model: Any, tokenizer: Any, skill: str, n: int, seed: int = 0, split: Split = "calib",
                   phrasings: str = "exemplar") -> float:
    """Teacher-forced exact match (see ``experts.finetune.answer_matches``) on ``n`` examples."""
    examples = get_skill(skill).examples(split, n, seed, phrasings)
    hits = answer_matches(model, tokenizer, examples)
    return sum(hits) / len(hits)
