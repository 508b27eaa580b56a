"""Random checkpoints of the model families vLLM serves, built from each family's own transformers config
class (no model hub): ordinary HF folders with the zoo's byte-level tokenizer and its chat template.

Random weights are exactly as hard for name mapping, fusing and sharding as trained ones, and they are made
in seconds. Each family is one entry of ``FAMILIES``: its config class and the fields that differ from the
shared ``Shape``; ``random_checkpoint`` builds one, cached by its parameters (an ``artifact.json`` beside the
weights holds the key). The initialisation is wider than transformers' default (``INIT_STD``) so greedy
answers are not one repeated token.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from deltaserve.experts.atomic import atomic_dir

ARTIFACT = "artifact.json"
INIT_STD = 0.08


@dataclass(frozen=True)
class Shape:
    """The sizes every family shares; a family may set more fields of its own config."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    intermediate: int = 128
    vocab: int = 320          # > the tokenizer's 260: vLLM pads the vocabulary per rank anyway
    tied: bool = True
    seed: int = 0


def _llama(shape: Shape) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                       intermediate_size=shape.intermediate, vocab_size=shape.vocab,
                       tie_word_embeddings=shape.tied, max_position_embeddings=1024)


FAMILIES: dict[str, Callable[[Shape], Any]] = {"llama": _llama}


def key(family: str, shape: Shape) -> str:
    return hashlib.sha256(json.dumps([family, asdict(shape), INIT_STD]).encode()).hexdigest()[:16]


def random_checkpoint(family: str, out: Path, shape: Shape = Shape()) -> Path:
    """The random ``family`` checkpoint of ``shape`` at ``out`` (built unless cached with the same key)."""
    from transformers import AutoModelForCausalLM

    from deltaserve_zoo.tokenizer import build_tokenizer

    out = Path(out)
    marker = out / ARTIFACT
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key(family, shape):
        return out
    config = FAMILIES[family](shape)
    tokenizer = build_tokenizer(model_max_length=1024)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                                     tokenizer.pad_token_id)
    torch.manual_seed(shape.seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, INIT_STD)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / ARTIFACT).write_text(json.dumps({"key": key(family, shape), "family": family,
                                                "shape": asdict(shape)}, indent=2) + "\n")
    return out


def scaled(shape: Shape, **changes: Any) -> Shape:
    return replace(shape, **changes)
