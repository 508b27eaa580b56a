"""Task vectors: tau = theta_finetuned - theta_base, from HF checkpoints or PEFT LoRAs.

Only safetensors checkpoints are read (pickle-based ``.bin`` files are refused,
never unpickled). A fine-tuned model must belong to the base: same
architecture, and every base parameter present with the same shape. Parameters
the fine-tune has and the base lacks (e.g. a task head) are *carried* alongside
the task vector, not merged.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

# Config fields that must agree between a base and anything derived from it.
_ARCH_FIELDS = (
    "model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
)  # fmt: skip
_FINGERPRINT_SAMPLE = 4096  # leading elements of each tensor hashed into the fingerprint


class TaskVectorError(ValueError):
    """The inputs cannot give a task vector (wrong base, bad files, unsupported adapter)."""


@dataclass(frozen=True)
class LoraFactors:
    """One adapted matrix: delta = scaling * B @ A (A: [r, in], B: [out, r])."""

    A: Tensor
    B: Tensor
    scaling: float

    def delta(self) -> Tensor:
        return (self.B.float() @ self.A.float()) * self.scaling


@dataclass(frozen=True)
class TaskVector:
    deltas: dict[str, Tensor]
    base_fingerprint: str
    kind: Literal["full", "lora"]
    source: str
    carried: dict[str, Tensor] = field(default_factory=dict)

    def num_params(self) -> int:
        return sum(t.numel() for t in self.deltas.values())


def _weight_files(model_dir: Path) -> list[Path]:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise TaskVectorError(f"{model_dir} is not a directory")
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
        hint = (f" (found {pickled}: pickle-based checkpoints are never loaded; convert them to safetensors)"
                if pickled else "")
        raise TaskVectorError(f"{model_dir} has no *.safetensors weights{hint}")
    return files


def load_state_dict(model_dir: Path) -> dict[str, Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint directory."""
    out: dict[str, Tensor] = {}
    for path in _weight_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as fh:
                for name in fh.keys():
                    out[name] = fh.get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise TaskVectorError(f"cannot read {path}: {err}") from err
    return out


def _config(model_dir: Path) -> dict:
    if not Path(model_dir).is_dir():
        raise TaskVectorError(f"{model_dir} is not a directory")
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise TaskVectorError(f"{model_dir} has no config.json (not an HF model directory)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TaskVectorError(f"{path} is not valid JSON: {err}") from err


def base_fingerprint(model_dir: Path) -> str:
    """Identity of a base model: architecture fields, tensor names/shapes/dtypes and
    a hash of each tensor's leading elements (cheap even at 7B scale)."""
    config = _config(model_dir)
    digest = hashlib.sha256(json.dumps({k: config.get(k) for k in _ARCH_FIELDS}, sort_keys=True).encode())
    for path in _weight_files(model_dir):
        with safe_open(str(path), framework="pt") as fh:
            for name in sorted(fh.keys()):
                sl = fh.get_slice(name)
                shape = sl.get_shape()
                head = _leading_elements(fh, sl, name, shape)
                digest.update(f"{name}|{shape}|{sl.get_dtype()}|".encode())
                digest.update(head.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def _leading_elements(fh, sl, name: str, shape: list[int]) -> Tensor:
    """The first _FINGERPRINT_SAMPLE elements (row-major), reading only the rows that hold them."""
    if not shape:
        return fh.get_tensor(name).reshape(-1)
    row = math.prod(shape[1:]) or 1
    rows = min(shape[0], -(-_FINGERPRINT_SAMPLE // row))
    return sl[:rows].reshape(-1)[:_FINGERPRINT_SAMPLE].contiguous()


def _shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the safetensors headers, without reading any data."""
    out = {}
    for path in _weight_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as fh:
                out.update({name: tuple(fh.get_slice(name).get_shape()) for name in fh.keys()})
        except (SafetensorError, OSError) as err:
            raise TaskVectorError(f"cannot read {path}: {err}") from err
    return out


def first_offending_tensor(base: dict[str, tuple[int, ...]], other: dict[str, tuple[int, ...]],
                           vocab_size: int | None = None) -> str | None:
    """The first base tensor (in name order) ``other`` lacks or shapes differently, said for a user; a wrong
    vocabulary is named as such (the embedding's or the head's first dimension is the base's vocab_size)."""
    for name in sorted(base):
        if name not in other:
            extra = sorted(set(other) - set(base))
            hint = f" (it has {extra[0]!r} instead)" if extra else ""
            return f"{name!r} is missing{hint}"
        if other[name] != base[name]:
            vocab = (f"; vocabulary size {other[name][0]} vs the base's {vocab_size}"
                     if vocab_size is not None and base[name][0] == vocab_size != other[name][0] else "")
            return f"{name!r} has shape {other[name]}, the base's is {base[name]}{vocab}"
    return None


def _config_diffs(base_dir: Path, other_dir: Path) -> list[str]:
    base, other = _config(base_dir), _config(other_dir)
    return [f"{k}: base {base.get(k)!r} vs {other.get(k)!r}" for k in _ARCH_FIELDS if base.get(k) != other.get(k)]


def check_same_architecture(base_dir: Path, other_dir: Path) -> None:
    """Raise naming the first offending tensor (then the config fields that differ) unless ``other_dir``'s
    tensors and architecture are the base's."""
    diffs = _config_diffs(base_dir, other_dir)
    base, other = _shapes(base_dir), _shapes(other_dir)
    tensor = first_offending_tensor(base, other, _config(base_dir).get("vocab_size"))
    extra = sorted(set(other) - set(base))
    if tensor is None and diffs and extra:     # another family with the base's tensors and more of its own
        tensor = f"{extra[0]!r} is not in the base"
    if tensor or diffs:
        first = [f"first offending tensor {tensor}"] if tensor else []
        raise TaskVectorError(f"{other_dir} does not fit base {base_dir}: " + "; ".join(first + diffs))


def extract_full(base_dir: Path, finetuned_dir: Path) -> TaskVector:
    """tau = finetuned - base for every base parameter (float32); extra parameters carried."""
    check_same_architecture(base_dir, finetuned_dir)
    base, tuned = load_state_dict(base_dir), load_state_dict(finetuned_dir)
    deltas = {n: tuned[n].float() - base[n].float() for n in base}
    carried = {n: t for n, t in tuned.items() if n not in base}
    return TaskVector(deltas, base_fingerprint(base_dir), "full", str(finetuned_dir), carried)


def _adapter_config(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise TaskVectorError(f"{adapter_dir} has no adapter_config.json (not a PEFT adapter directory)")
    config = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise TaskVectorError(f"{adapter_dir}: only LoRA adapters are supported, "
                              f"got peft_type={config.get('peft_type')!r}")
    unsupported = [k for k in ("use_dora", "fan_in_fan_out") if config.get(k)]
    if unsupported or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise TaskVectorError(f"{adapter_dir}: unsupported LoRA options "
                              f"{unsupported or ['rank_pattern/alpha_pattern']}")
    return config


def _base_name(adapter_key: str) -> tuple[str, str] | None:
    """'base_model.model.X.lora_A.weight' -> ('X.weight', 'A')."""
    for part in ("A", "B"):
        marker = f".lora_{part}.weight"
        if adapter_key.endswith(marker):
            name = adapter_key[: -len(marker)].removeprefix("base_model.model.")
            return f"{name}.weight", part
    return None


def lora_factors(base_dir: Path, adapter_dir: Path) -> tuple[dict[str, LoraFactors], dict[str, Tensor]]:
    """Per adapted base weight, its LoRA factors; plus carried (modules_to_save) tensors."""
    config = _adapter_config(adapter_dir)
    rank, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / (rank**0.5) if config.get("use_rslora") else alpha / rank
    tensors = load_state_dict(adapter_dir)
    base = _shapes(base_dir)
    halves: dict[str, dict[str, Tensor]] = {}
    carried: dict[str, Tensor] = {}
    for key, value in tensors.items():
        parsed = _base_name(key)
        if parsed is None:
            carried[key.removeprefix("base_model.model.")] = value
            continue
        halves.setdefault(parsed[0], {})[parsed[1]] = value
    factors = {}
    for name, pair in sorted(halves.items()):
        if name not in base:
            raise TaskVectorError(f"{adapter_dir} does not fit base {base_dir}: first offending tensor {name!r} "
                                  f"adapts a weight the base does not have")
        if set(pair) != {"A", "B"}:
            raise TaskVectorError(f"{adapter_dir}: {name!r} lacks lora_{({'A', 'B'} - set(pair)).pop()}")
        a, b = pair["A"], pair["B"]
        if (b.shape[0], a.shape[1]) != base[name] or a.shape[0] != b.shape[1]:
            raise TaskVectorError(f"{adapter_dir} does not fit base {base_dir}: first offending tensor {name!r}: "
                                  f"factors {tuple(b.shape)}@{tuple(a.shape)} do not fit the base's {base[name]}")
        factors[name] = LoraFactors(a, b, scaling)
    if not factors:
        raise TaskVectorError(f"{adapter_dir} holds no lora_A/lora_B weights")
    return factors, carried


def extract_lora(base_dir: Path, adapter_dir: Path) -> TaskVector:
    """tau = scaling * B @ A per adapted weight, named like the base parameter."""
    factors, carried = lora_factors(base_dir, adapter_dir)
    deltas = {name: f.delta() for name, f in factors.items()}
    return TaskVector(deltas, base_fingerprint(base_dir), "lora", str(adapter_dir), carried)
