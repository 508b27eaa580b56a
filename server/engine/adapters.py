"""The LoRA path: a recipe of low-rank experts becomes ONE exact merged PEFT adapter.

sum_i w_i * B_i A_i == B_cat @ A_cat with A_cat = [w_1 A_1; ...; w_n A_n] and
B_cat = [B_1 ... B_n] (experts.lora_merge.lora_concat), rank sum r_i. Modules an
expert does not adapt get zero blocks, so every module has the same rank R and
the adapter is a plain PEFT LoRA (r = lora_alpha = R, scaling 1) that vLLM
loads per request. Adapters are written once into a RAM-backed directory
(/dev/shm when present) and kept in an LRU of bounded size; an evicted
adapter's folder is removed and vLLM is told to drop it.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections import OrderedDict
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from deltaserve.experts.atomic import atomic_dir, pid_alive
from deltaserve.experts.expert import Expert
from deltaserve.experts.merge.lora import lora_concat
from deltaserve.experts.lowrank import lowrank as svd_factors

#: The projections a proxy adapts when the engine has not said what vLLM's LoRA adapts (server.worker.layout).
LORA_MODULE_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class AdapterError(ValueError):
    pass


@dataclass(frozen=True)
class MergedAdapter:
    key: str
    lora_id: int
    path: Path
    rank: int
    nbytes: int
    experts: tuple[str, ...] = ()


def write_merged_adapter(out: Path, experts: Sequence[Expert], weights: Sequence[float], base_shapes: dict,
                         *, base_model: str = "", adaptable: Container[str] | None = None) -> int:
    """Write the exact merged adapter of ``sum w_i * expert_i`` to ``out``; returns its rank."""
    ranks = []
    for e in experts:
        if not e.manifest.lowrank:
            raise AdapterError(f"expert {e.manifest.name!r} is not low-rank (codec {e.manifest.codec})")
        ranks.append(e.manifest.rank or 0)
    rank = sum(ranks)
    names = sorted({n for e in experts for n in e.param_names})
    for name in names:   # the planner sends only what vLLM's LoRA adapts on this model (server.engine.planner)
        if not name.endswith(".weight") or len(base_shapes.get(name, ())) != 2:
            raise AdapterError(f"{name!r} is not a linear projection's weight")
    # Every module with a target suffix gets an entry, zero if no expert adapts it.
    suffixes = sorted({n.rsplit(".", 2)[-2] for n in names})
    modules = sorted(n for n in base_shapes if n.endswith(".weight") and n.rsplit(".", 2)[-2] in suffixes
                     and (adaptable is None or n in adaptable))
    tensors = {}
    for name in modules:
        out_f, in_f = base_shapes[name]
        pairs = []
        for e, r in zip(experts, ranks):
            if name in e.param_names:
                a, b = e.factors(name, torch.float32)
                pad = r - a.shape[0]
                if pad:
                    a = torch.cat([a, torch.zeros(pad, in_f)], 0)
                    b = torch.cat([b, torch.zeros(out_f, pad)], 1)
            else:
                a, b = torch.zeros(r, in_f), torch.zeros(out_f, r)
            pairs.append((a, b))
        a_cat, b_cat = lora_concat(pairs, list(weights), [1.0] * len(pairs))
        stem = "base_model.model." + name.removesuffix(".weight")
        tensors[f"{stem}.lora_A.weight"] = a_cat.contiguous()
        tensors[f"{stem}.lora_B.weight"] = b_cat.contiguous()
    _write_peft(out, tensors, rank, suffixes, base_model)
    return rank


def _write_peft(out: Path, tensors: dict, rank: int, target_modules: Iterable[str], base_model: str = "") -> None:
    """A plain PEFT LoRA folder (r = lora_alpha = rank, so scaling 1), published atomically."""
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
        "target_modules": sorted(target_modules), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "base_model_name_or_path": base_model, "modules_to_save": None, "inference_mode": True,
    }
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir())


def default_adapter_root() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() else Path("/tmp")


class AdapterCache:
    """Merged adapters by recipe key; LRU over ``capacity`` adapters (the device tier's LoRA slots).

    An adapter in use is never removed: ``acquire``/``build`` pin it for one request and
    ``release`` unpins it. Eviction skips pinned adapters (the cache may then hold more than
    ``capacity`` until they are released), and an invalidated adapter that is pinned is
    *retired*: unreachable by key, its files kept until its last release. Methods that end an
    adapter's life return it in a list; the caller removes it from vLLM and deletes its files
    (``remove_files``), so no queued request ever points at a deleted folder.
    """

    def __init__(self, root: Path, capacity: int = 32) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.capacity = max(1, capacity)
        self._items: OrderedDict[str, MergedAdapter] = OrderedDict()
        self._pins: dict[int, int] = {}
        self._retired: dict[int, MergedAdapter] = {}
        self._next_id = 1
        self._lock = threading.Lock()

    def acquire(self, key: str) -> MergedAdapter | None:
        """The adapter for ``key``, pinned for one user, or None."""
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                self._pins[item.lora_id] = self._pins.get(item.lora_id, 0) + 1
            return item

    def release(self, adapter: MergedAdapter) -> list[MergedAdapter]:
        """Unpin one use of ``adapter``; returns the adapters whose life ends now."""
        with self._lock:
            left = self._pins.get(adapter.lora_id, 0) - 1
            if left > 0:
                self._pins[adapter.lora_id] = left
                return []
            self._pins.pop(adapter.lora_id, None)
            ended = [self._retired.pop(adapter.lora_id)] if adapter.lora_id in self._retired else []
            return ended + self._trim()

    def build(self, key: str, experts: Sequence[Expert], weights: Sequence[float], base_shapes: dict,
              base_model: str = "", adaptable: Container[str] | None = None
              ) -> tuple[MergedAdapter, list[MergedAdapter]]:
        """Build (or return) the adapter for ``key``, pinned; returns it and the adapters evicted to make room."""
        return self._build(key, lambda path: write_merged_adapter(path, experts, weights, base_shapes,
                                                                  base_model=base_model, adaptable=adaptable),
                           tuple(e.manifest.name for e in experts))

    def build_proxy(self, key: str, expert: Expert, rank: int, base_shapes: dict,
                    adaptable: Container[str] | None = None) -> tuple[MergedAdapter, list[MergedAdapter]]:
        """A rank-``rank`` SVD adapter approximating a full-rank expert's projections (scoring only), pinned."""
        return self._build(key, lambda path: write_svd_adapter(path, expert, rank, base_shapes, adaptable),
                           (expert.manifest.name,))

    def _build(self, key: str, write, experts: tuple[str, ...]) -> tuple[MergedAdapter, list[MergedAdapter]]:
        """The cached adapter for ``key``, or ``write(path) -> rank`` a new one and insert it (LRU); pinned."""
        existing = self.acquire(key)
        if existing is not None:
            return existing, []
        with self._lock:
            lora_id = self._next_id
            self._next_id += 1
        path = self.root / f"adapter-{lora_id}"
        rank = write(path)
        item = MergedAdapter(key, lora_id, path, rank, _dir_bytes(path), experts)
        with self._lock:
            raced = self._items.get(key)
            if raced is None:
                self._items[key] = item
                self._pins[lora_id] = 1
                return item, self._trim()
        self.remove_files([item])          # built twice concurrently: keep the first
        return (self.acquire(key) or self._build(key, write, experts)[0]), []

    def _trim(self) -> list[MergedAdapter]:
        """Evict least recently used unpinned adapters beyond capacity (call with the lock held)."""
        evicted = []
        for key in list(self._items):
            if len(self._items) <= self.capacity:
                break
            if self._items[key].lora_id not in self._pins:
                evicted.append(self._items.pop(key))
        return evicted

    def invalidate(self, expert: str) -> list[MergedAdapter]:
        """Drop every adapter whose recipe uses ``expert`` (deleted or replaced); returns those free now."""
        with self._lock:
            stale = [self._items.pop(k) for k, a in list(self._items.items()) if expert in a.experts]
            free = [a for a in stale if a.lora_id not in self._pins]
            self._retired.update({a.lora_id: a for a in stale if a.lora_id in self._pins})
            return free

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in [*self._items.values(), *self._retired.values()])

    def keys(self) -> list[str]:
        """The cached adapters' keys, least recently used first."""
        with self._lock:
            return list(self._items)

    @property
    def pinned(self) -> int:
        return len(self._pins)

    def remove_files(self, adapters: Sequence[MergedAdapter]) -> None:
        for a in adapters:
            shutil.rmtree(a.path, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def clean_stale_roots(parent: Path, prefix: str = "deltaserve-adapters-") -> list[Path]:
    """Remove adapter roots left by processes that no longer run (``<prefix><pid>-<tag>``)."""
    removed = []
    for path in Path(parent).glob(f"{prefix}*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def write_svd_adapter(out: Path, expert: Expert, rank: int, base_shapes: dict,
                      adaptable: Container[str] | None = None) -> int:
    """Truncated SVD of each projection of ``expert`` that vLLM's LoRA adapts (``adaptable``: checkpoint names;
    default: Llama's projection names) as a PEFT LoRA (r = alpha = rank)."""
    tensors, suffixes = {}, set()
    for name in expert.param_names:
        if adaptable is not None and name not in adaptable:
            continue   # embeddings, norms, MoE experts: outside what vLLM's LoRA adapts; the proxy ignores them
        if adaptable is None and (not name.endswith(".weight") or name.rsplit(".", 2)[-2] not in LORA_MODULE_SUFFIXES):
            continue
        delta = expert.decode(name, torch.float32)
        r = min(rank, *delta.shape)
        a, b = svd_factors(delta, rank=r)
        if r < rank:
            a = torch.cat([a, torch.zeros(rank - r, a.shape[1])], 0)
            b = torch.cat([b, torch.zeros(b.shape[0], rank - r)], 1)
        stem = "base_model.model." + name.removesuffix(".weight")
        tensors[f"{stem}.lora_A.weight"] = a.contiguous()
        tensors[f"{stem}.lora_B.weight"] = b.contiguous()
        suffixes.add(name.rsplit(".", 2)[-2])
    if not tensors:
        raise AdapterError(f"expert {expert.manifest.name!r} adapts no linear projection")
    _write_peft(out, tensors, rank, suffixes)
    return rank
