"""Merge stored experts into a base checkpoint: theta = theta_base + scale * merge(tau_1..n).

The merge runs one parameter at a time (only that parameter's deltas are
decoded), checks the result is finite before anything is written (PEFT's
``safe_merge`` rule), and publishes a loadable HF checkpoint atomically: the
base directory's config and tokenizer files plus the merged safetensors.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from deltaserve.experts.atomic import atomic_dir
from deltaserve.experts.expert import Expert, load_expert
from deltaserve.experts.merge.registry import MERGE_METHODS, MergeMethod, get_merge_method
from deltaserve.experts.taskvector import base_fingerprint, load_state_dict

class MergeError(ValueError):
    """The experts cannot be merged into this base."""


def load_experts_for(base_dir: Path, expert_dirs: Sequence[Path]) -> list[Expert]:
    """Load experts and refuse any made for another base (fingerprint and shapes)."""
    fingerprint = base_fingerprint(base_dir)
    experts = [load_expert(d) for d in expert_dirs]
    for expert in experts:
        if expert.manifest.base_fingerprint != fingerprint:
            raise MergeError(f"expert {expert.manifest.name!r} was made for another base "
                             f"({expert.manifest.base_fingerprint[:12]}, this base is {fingerprint[:12]})")
    return experts


def merged_state_dict(
    base: Mapping[str, Tensor],
    experts: Sequence[Expert],
    method: str,
    weights: Sequence[float],
    scale: float = 1.0,
    **options: Any,
) -> dict[str, Tensor]:
    """Base weights plus ``scale`` times the merged deltas, parameter by parameter."""
    if len(weights) != len(experts):
        raise MergeError(f"{len(weights)} weights for {len(experts)} experts")
    names = sorted({n for e in experts for n in e.param_names})

    def delta(i: int, name: str) -> Tensor | None:
        return experts[i].decode(name, dtype=torch.float32) if name in experts[i].param_names else None

    out = dict(base)
    out.update(merged_params(names, base, delta, len(experts), method, weights, scale, options))
    return out


def merged_params(
    names: Iterable[str],
    base: Mapping[str, Tensor],
    delta: Callable[[int, str], Tensor | None],
    n_experts: int,
    method: str | MergeMethod,
    weights: Sequence[float],
    scale: float = 1.0,
    options: Mapping[str, Any] | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """``(name, base + scale * merge(deltas))`` for each name: the one per-parameter merge loop.

    ``delta(i, name)`` is expert i's float32 delta of ``name`` or None when it
    does not change it (a parameter no expert changes is yielded as the base).
    ``deltaserve merge`` and the serving engine's dense path both run this, so a
    served recipe and the written checkpoint are bit-identical. Methods with a
    ``seed`` option draw from one random stream per parameter (seeded from the
    seed and the parameter's name), so the result does not depend on the order.
    """
    merge = method if isinstance(method, MergeMethod) else get_merge_method(method)
    checked = MERGE_METHODS.parse_options(merge.name, options or {}).model_dump()
    for name in names:
        if name not in base:
            raise MergeError(f"parameter {name!r} of an expert is not in the base")
        deltas = [delta(i, name) for i in range(n_experts)]
        if all(d is None for d in deltas):
            yield name, base[name]
            continue
        zeros = torch.zeros(base[name].shape, dtype=torch.float32)
        runtime = {"generator": torch.Generator().manual_seed(param_seed(checked["seed"], name))} \
            if "seed" in checked and "generator" in merge.runtime else {}
        yield name, merged_param(name, base[name], [zeros if d is None else d for d in deltas], merge, weights,
                                 scale, **checked, **runtime)


def param_seed(seed: int, name: str) -> int:
    """A stable per-parameter seed (the same on every machine and run)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def merged_param(name: str, base: Tensor, deltas: Sequence[Tensor], merge: Any, weights: Sequence[float],
                 scale: float = 1.0, **options: Any) -> Tensor:
    """One parameter: ``base + scale * merge(deltas, weights)`` computed in float32, cast to base's dtype.

    The result must be finite (PEFT's ``safe_merge`` rule): nothing is written otherwise.
    """
    if isinstance(merge, str):
        merge = get_merge_method(merge)
    merged = merge(list(deltas), list(weights), **options)
    value = base.float() + scale * merged
    if not torch.isfinite(value).all():
        raise MergeError(f"merging {name!r} with {merge.name if hasattr(merge, 'name') else merge} produced NaN/Inf; "
                         "nothing was written")
    return value.to(base.dtype)


def write_checkpoint(base_dir: Path, state_dict: Mapping[str, Tensor], out: Path) -> None:
    """The base's non-weight files (config, tokenizer, ...) plus ``state_dict`` as safetensors."""
    base_dir = Path(base_dir)
    with atomic_dir(Path(out)) as tmp:
        for path in base_dir.iterdir():
            if (path.is_file() and path.suffix not in (".safetensors", ".bin")
                    and path.name != "model.safetensors.index.json"):
                shutil.copy2(path, tmp / path.name)
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})


def merge_into_checkpoint(
    base_dir: Path,
    expert_dirs: Sequence[Path],
    out: Path,
    *,
    method: str = "task_arithmetic",
    weights: Sequence[float] | None = None,
    scale: float = 1.0,
    **options: Any,
) -> None:
    experts = load_experts_for(base_dir, expert_dirs)
    weights = list(weights) if weights is not None else [1.0] * len(experts)
    state = merged_state_dict(load_state_dict(base_dir), experts, method, weights, scale, **options)
    write_checkpoint(base_dir, state, out)
