"""What the worker extension keeps in vLLM's worker process: the base's host copy, the experts it has
loaded, the host cache, and the merged tensors of a recipe (W_base + merge(tau)).

Every recipe is computed from the base (never from the previous recipe), so switching back to the
base restores it bit-exactly. Through vLLM's reload pass a module is rebuilt from what it is given, so a
touched tensor brings every tensor of its module along (q with k and v, an MoE expert with its layer's
others: server.worker.layout, asked of the model); written in place, a tensor goes alone.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from deltaserve.experts.bitpack import add_entries, flat_target
from deltaserve.experts.expert import Expert, load_pinned
from deltaserve.experts.merge.checkpoint import merged_params
from deltaserve.server.engine.contracts import MergeRequest
from deltaserve.server.worker.base_weights import BaseWeights
from deltaserve.server.worker.host_cache import HostDeltaCache
from deltaserve.server.worker.layout import ModelLayout
from deltaserve.server.worker.loading import LoadMode

class DeltaState:
    """Everything the extension keeps in the worker process."""

    def __init__(self, base_dir: str, host_cache_bytes: int) -> None:
        self.base_dir = Path(base_dir)
        self.base = BaseWeights(self.base_dir)
        self.mode: LoadMode = "reload"   # how swaps reach the weights (server.worker.loading)
        self.layout = ModelLayout()      # set at setup (server.worker.layout.probe_layout)
        self.cache = HostDeltaCache(host_cache_bytes)
        self.experts: dict[str, Expert] = {}
        self.applied: set[str] = set()   # parameters that currently differ from the base

    def expert(self, directory: str, token: str) -> Expert:
        """The expert version ``token`` names, loaded once; its digests are checked before its data is
        first used and re-checked (by a stat) on every read after that."""
        cached = self.experts.get(token)
        if cached is None:
            # Pinned: a replacement swapped in at the expert's path, or this version's retirement, does not
            # change what later (cache-miss) reads see.
            def check(expert: Expert) -> None:
                digest = expert.manifest.sha256.get("tensors.safetensors", "")
                if not token.endswith("@" + digest[:16]):
                    raise ValueError(f"expert {expert.manifest.name!r} at {directory} is not version {token}")
                expert.check_digests()

            cached = self.experts[token] = load_pinned(os.open(directory, os.O_RDONLY | os.O_DIRECTORY), check)
        return cached

    def expand(self, names: set[str]) -> set[str]:
        """The tensors a swap of ``names`` must load: their modules' others too when reloading."""
        return self.layout.siblings(names) if self.mode == "reload" else set(names)

    def weights(self, request: MergeRequest, targets: set[str], restore: set[str],
                timing: dict[str, float] | None = None) -> Iterator[tuple[str, Tensor]]:
        """The tensors to load: ``targets`` merged from the base (experts.merge.checkpoint), ``restore`` as the base.
        ``timing["decode"]`` accumulates the seconds spent getting deltas (host cache or decoding)."""
        experts = [(self.expert(item.path, item.token), item.token) for item in request.items]
        timing = timing if timing is not None else {}
        timing.setdefault("decode", 0.0)
        if _adds_in_place(request, [e for e, _ in experts]):
            yield from self._added_in_place(experts, [item.weight for item in request.items], targets, restore,
                                            timing)
            return

        def delta(i: int, name: str) -> Tensor | None:
            expert, token = experts[i]
            if name not in expert.param_names:
                return None
            start = time.perf_counter()
            try:
                return self.cache.get(token, expert, name)
            finally:
                timing["decode"] += time.perf_counter() - start

        yield from merged_params(sorted(targets), self.base, delta, len(experts), request.method,
                                 [item.weight for item in request.items], 1.0, request.options)
        for name in sorted(restore):
            yield name, self.base[name]

    def _added_in_place(self, experts: list[tuple[Expert, str]], weights: list[float], targets: set[str],
                        restore: set[str], timing: dict[str, float]) -> Iterator[tuple[str, Tensor]]:
        """Sparse and low-rank (LoRA) experts, linearly: a sparse expert by adding its kept entries
        (``Expert.entries``: decoded once into the host cache, then only scattered on later swaps), a low-rank
        one by its codec's ``add_into`` (``B @ A`` a block of rows at a time), instead of decoding each tau
        densely for the stacked merge (bench/kernels/swap.py measures both). Bit-identical to merged_params'
        task arithmetic ``base + (w_1 tau_1 + w_2 tau_2 + ...)``: one expert is added into a copy of the base
        (base + w v where kept, base + 0 elsewhere); several are first summed into a float32 zero tensor in the
        recipe's order (overlapping entries summed before the add; elsewhere 0 + w v is exactly w v)."""
        for name in sorted(targets):
            mine = [(e, token, w) for (e, token), w in zip(experts, weights) if name in e.param_names]
            if not mine:
                yield name, self.base[name]
                continue
            start = time.perf_counter()
            kept = [self.cache.entries(token, expert, name) if expert.codec.sparse_entries else None
                    for expert, token, _ in mine]
            timing["decode"] += time.perf_counter() - start
            one = len(mine) == 1
            target = self.base[name].clone() if one else torch.zeros(self.base[name].shape, dtype=torch.float32)
            for (expert, _, w), entries in zip(mine, kept):
                if entries is None:
                    expert.add_into(name, target, w)
                else:
                    add_entries(flat_target(target), *entries, w)
            value = target if one else (self.base[name].float() + target).to(self.base[name].dtype)
            # one summing pass (an elementwise isfinite took 40 % of the swap); a NaN/Inf anywhere makes the
            # sum non-finite, and a non-finite sum of finite values (overflow) is re-checked elementwise
            if not torch.isfinite(value.sum()) and not torch.isfinite(value).all():
                raise ValueError(f"adding {[e.manifest.name for e, _, _ in mine]} to {name!r} produced NaN/Inf")
            yield name, value
        for name in sorted(restore):
            yield name, self.base[name]


def _adds_in_place(request: MergeRequest, experts: list[Expert]) -> bool:
    """Sparse or low-rank experts merged linearly (the common dense-path recipes: one compressed expert, a
    LoRA served merged, or a weighted blend of them): added in place instead of the decode-and-merge loop."""
    return (request.method == "task_arithmetic" and len(experts) >= 1 and not request.options
            and all(e.codec.sparse_entries or e.codec.lowrank for e in experts))
