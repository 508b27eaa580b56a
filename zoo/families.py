"""Random checkpoints of the model families vLLM serves, built from each family's own transformers config
class (no model hub): ordinary HF folders with the zoo's byte-level tokenizer and its chat template, plus a
random PEFT LoRA and a random full fine-tune of each.

Random weights are exactly as hard for name mapping, fusing and sharding as trained ones, and they are made
in seconds. A family is one ``Family``: its transformers config class (by name) and the config fields that
differ from the shared ``Shape``, so a family transformers and vLLM know is one line here (or in a test's
list). ``random_checkpoint``, ``random_lora`` and ``random_finetune`` build into a folder, cached by their
parameters (an ``artifact.json`` beside the weights holds the key). The initialisation is wider than
transformers' default (``INIT_STD``) so greedy answers are not one repeated token.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from deltaserve.experts.atomic import atomic_dir

ARTIFACT = "artifact.json"
INIT_STD = 0.2       # matrices; transformers' 0.02 makes a random model repeat one token
VECTOR_STD = 1.0     # added to every vector (norm weights, biases): each family's norm offsets and biases matter
LORA_STD = 0.1      # A and B entries: B @ A entries ~ sqrt(rank) * 0.01, a visible change of the answers
FINETUNE_STD = 0.02


@dataclass(frozen=True)
class Shape:
    """The sizes every family shares."""

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    intermediate: int = 128
    vocab: int = 320          # > the tokenizer's 260: vLLM pads the vocabulary per rank anyway
    tied: bool = True
    seed: int = 0


@dataclass(frozen=True)
class Family:
    """A transformers config class (by name) and the fields this family sets beyond the shared shape."""

    config: str
    fields: dict[str, Any] = field(default_factory=dict)
    moe: bool = False
    embed_std: float = INIT_STD   # Gemma scales its embeddings by sqrt(hidden): smaller, or they drown the layers

    def build_config(self, shape: Shape, **tokens: int) -> Any:
        import transformers

        cls = getattr(transformers, self.config)
        accepted = inspect.signature(cls.__init__).parameters
        common = {"hidden_size": shape.hidden, "num_hidden_layers": shape.layers,
                  "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads,
                  "head_dim": shape.head_dim, "intermediate_size": shape.intermediate, "vocab_size": shape.vocab,
                  "tie_word_embeddings": shape.tied, "max_position_embeddings": 1024}
        return cls(**{k: v for k, v in common.items() if k in accepted}, **tokens, **self.fields)


# Families named as vLLM's docs and the issue name them; the fields keep each one's own mechanisms on
# (Gemma's soft-capping and sliding windows, Granite's multipliers, Qwen2's q/k/v bias, Phi-3's fused
# projections, the MoE routers) at the shared small size.
FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaConfig"),
    "qwen2": Family("Qwen2Config"),
    "qwen3": Family("Qwen3Config"),
    "mistral": Family("MistralConfig", {"sliding_window": None}),
    "gemma2": Family("Gemma2Config", {"query_pre_attn_scalar": 32, "sliding_window": 64}, embed_std=0.02),
    "gemma3": Family("Gemma3TextConfig", {"query_pre_attn_scalar": 32, "sliding_window": 64}, embed_std=0.02),
    "phi3": Family("Phi3Config"),
    "granite": Family("GraniteConfig", {"embedding_multiplier": 4.0, "residual_multiplier": 0.5,
                                        "attention_multiplier": 0.05, "logits_scaling": 2.0}),
    "olmo2": Family("Olmo2Config"),
    "qwen3_moe": Family("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2,
                                           "moe_intermediate_size": 64}, moe=True),
    "mixtral": Family("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}, moe=True),
}


def _key(*parts: Any) -> str:
    record = json.dumps([*parts, INIT_STD, VECTOR_STD, LORA_STD, FINETUNE_STD], default=str)
    return hashlib.sha256(record.encode()).hexdigest()[:16]


def _cached(out: Path, key: str, build: Callable[[Path], dict]) -> Path:
    """``out`` if it holds the artifact of ``key``, else ``build(staging folder)`` published there atomically."""
    out = Path(out)
    marker = out / ARTIFACT
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        return out
    with atomic_dir(out) as tmp:
        info = build(tmp)
        (tmp / ARTIFACT).write_text(json.dumps({"key": key, **info}, indent=2, default=str) + "\n")
    return out


def family_of(name: str | Family) -> Family:
    if isinstance(name, Family):
        return name
    if name not in FAMILIES:
        raise KeyError(f"unknown family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def random_checkpoint(family: str | Family, out: Path, shape: Shape = Shape()) -> Path:
    """The random ``family`` checkpoint of ``shape`` at ``out`` (built unless cached with the same key)."""
    spec = family_of(family)

    def build(tmp: Path) -> dict:
        from transformers import AutoModelForCausalLM

        from deltaserve_zoo.tokenizer import build_tokenizer

        tokenizer = build_tokenizer(model_max_length=1024)
        config = spec.build_config(shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(shape.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        embeddings = model.get_input_embeddings().weight
        with torch.no_grad():
            for p in model.parameters():
                if p is embeddings:
                    p.normal_(0.0, spec.embed_std)
                elif p.dim() > 1:
                    p.normal_(0.0, INIT_STD)
                else:
                    p.add_(torch.randn_like(p) * VECTOR_STD)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        return {"family": spec.config, "shape": asdict(shape)}

    return _cached(out, _key("checkpoint", asdict(spec), asdict(shape)), build)


def load(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def lora_targets(model: Any) -> list[str]:
    """The names PEFT's ``all-linear`` adapts in ``model`` (every nn.Linear but the output head)."""
    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not head})


def random_lora(base: Path, out: Path, rank: int = 4, seed: int = 1, targets: list[str] | None = None) -> Path:
    """A PEFT LoRA of ``base`` on ``targets`` (default: every linear projection but the head, as ``all-linear``),
    with random A and B (so it changes the answers) and ``lora_alpha = rank`` (scaling 1)."""

    def build(tmp: Path) -> dict:
        from peft import LoraConfig, get_peft_model

        model = load(base)
        modules = targets or lora_targets(model)
        peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=modules, lora_dropout=0.0))
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_" in name:
                    p.normal_(0.0, LORA_STD)
        peft.peft_config["default"].base_model_name_or_path = str(Path(base).resolve())
        peft.save_pretrained(tmp)
        return {"base": str(base), "rank": rank, "targets": modules}

    return _cached(out, _key("lora", str(Path(base).resolve()), _artifact_key(base), rank, seed, targets), build)


def random_finetune(base: Path, out: Path, seed: int = 2) -> Path:
    """A full fine-tune of ``base``: every tensor (embeddings, norms, attention, MLP or MoE router and experts)
    moved by Gaussian noise of ``FINETUNE_STD``; an ordinary HF folder with the base's tokenizer."""

    def build(tmp: Path) -> dict:
        from transformers import AutoTokenizer

        model = load(base)
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * FINETUNE_STD)
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
        return {"base": str(base), "seed": seed}

    return _cached(out, _key("finetune", str(Path(base).resolve()), _artifact_key(base), seed), build)


def _artifact_key(folder: Path) -> str:
    marker = Path(folder) / ARTIFACT
    return json.loads(marker.read_text()).get("key", "") if marker.is_file() else ""


def scaled(shape: Shape, **changes: Any) -> Shape:
    return replace(shape, **changes)
