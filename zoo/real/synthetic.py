"""Random experts of a base (no training): a PEFT LoRA and a sparse task vector.

For what does not depend on what an expert learned: serving correctness
against HF (tests/test_real_serving.py) and serving speed on any machine
(bench/serving/gpu.py). The LoRA's B factors are scaled so that it changes the
answers without wrecking them; the sparse expert touches the tied embedding,
attention and MLP matrices.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

LORA_SCALE = 0.3
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPARSE_TOUCHED = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                  "model.layers.0.self_attn.k_proj.weight", "model.layers.5.mlp.down_proj.weight",
                  "model.layers.11.mlp.gate_proj.weight")


def random_lora(base: Path, out: Path, rank: int = 8, seed: int = 0, targets: Sequence[str] = LORA_TARGETS) -> Path:
    """A PEFT LoRA of ``base`` (rank ``rank`` on ``targets``: attention and MLP) with random A and scaled random B."""
    from peft import LoraConfig, get_peft_model

    from deltaserve.experts.hfmodel import load_causal_lm

    torch.manual_seed(seed)
    model = get_peft_model(load_causal_lm(base), LoraConfig(
        r=rank, lora_alpha=2 * rank, init_lora_weights=False, lora_dropout=0.0, target_modules=list(targets)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(LORA_SCALE)
    model.save_pretrained(out)
    return out


def random_sparse_expert(base: Path, out: Path, touched: Sequence[str] = SPARSE_TOUCHED, density: float = 0.02,
                         seed: int = 1, name: str = "random-sparse") -> Path:
    """A stored sparse expert: ``density`` of each ``touched`` matrix set to 3 std of that matrix, at random."""
    from deltaserve.experts.save import save_expert
    from deltaserve.experts.taskvector import base_fingerprint, load_state_dict

    state = load_state_dict(base)
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for param in touched:
        w = state[param]
        keep = torch.rand(w.shape, generator=gen) < density
        deltas[param] = torch.where(keep, torch.randn(w.shape, generator=gen) * 3 * w.std(), 0.0)
    save_expert(out, deltas, name=name, base_fingerprint=base_fingerprint(base), codec="sparse_ef",
                source="random sparse task vector", method={"name": "random"}, value_dtype=torch.float32)
    return out


#: The skills whose calib questions the synthetic LoRAs have as exemplars (the serving benchmark's `auto`).
SYNTHETIC_SKILLS = ("iso_date", "unit_convert", "json_extract", "sentiment")


def synthetic_names() -> tuple[list[str], list[str]]:
    """(sparse experts, LoRA experts) ``publish_synthetic`` registers."""
    return [f"sparse-{i}" for i in range(len(SYNTHETIC_SKILLS))], [f"lora-{i}" for i in range(len(SYNTHETIC_SKILLS))]


def sparse_touched(base: Path) -> tuple[str, ...]:
    """SPARSE_TOUCHED's kind of matrices for any Llama-shaped base: the embeddings, layer 0's q and k, a middle
    layer's down projection and the last layer's gate projection."""
    import json

    layers = json.loads((Path(base) / "config.json").read_text())["num_hidden_layers"]
    return ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.k_proj.weight", f"model.layers.{layers // 2}.mlp.down_proj.weight",
            f"model.layers.{layers - 1}.mlp.gate_proj.weight")


def publish_synthetic(base: Path, store: Path, work: Path) -> tuple[list[str], list[str]]:
    """4 random LoRAs (exemplars: the calib questions of SYNTHETIC_SKILLS) and 4 random sparse experts at 1 %
    (``sparse_touched``) into the store at ``store`` (sources written under ``work``); returns
    ``synthetic_names()``."""
    from deltaserve.experts.store import ExpertStore
    from deltaserve_zoo.real.skills import get_skill

    s = ExpertStore(store, base)
    for i, skill in enumerate(SYNTHETIC_SKILLS):
        calib = [e.question for e in get_skill(skill).examples("calib", 32, seed=1)]
        s.import_source(f"lora-{i}", random_lora(base, work / f"lora-{i}", seed=i), exemplars=calib)
        s.import_source(f"sparse-{i}", random_sparse_expert(base, work / f"sparse-{i}", sparse_touched(base), 0.01, i))
    return synthetic_names()
