"""The vLLM worker extension of the dense path: W = W_base + sum_i w_i * decode(tau_i), in place.

vLLM mixes ``DeltaWorkerExtension`` into its Worker (``worker_extension_cls``)
and the engine calls its methods with ``collective_rpc``; they run in the
worker process, next to the weights. The worker keeps a host copy of the base
weights, so every recipe is computed from the base (never from the previous
recipe) and switching back to the base restores it bit-exactly.

Weights go through ``model_runner.reload_weights(weights_iterator=...)``: it
runs the model's own loader (name mapping, q/k/v and gate/up fusion, the CPU
backend's weight repacking), so it works on vLLM-CPU and on GPU alike. A fused
module must be reloaded whole (reloading q alone corrupts k and v), so a touched
q/k/v or gate/up weight brings its siblings along.

Decoded deltas are cached in host RAM (LRU by bytes): the "host" cache tier.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from deltaserve.experts.atomic import pid_alive
from deltaserve.experts.bitpack import add_entries, flat_target
from deltaserve.experts.expert import Expert, load_pinned
from deltaserve.experts.merge.checkpoint import merged_params
from deltaserve.server.contracts import MergeRequest, SwapStats
from deltaserve.server.vllm_patches import patch_cpu_lora_ops

patch_cpu_lora_ops()   # this module is imported in vLLM's worker process: fix its CPU LoRA ops there

# Siblings that vLLM fuses into one module and that must be reloaded together.
_FUSED = (
    re.compile(r"^(?P<prefix>.*\.self_attn\.)(?P<member>q|k|v)_proj\.(?P<suffix>weight|bias)$"),
    re.compile(r"^(?P<prefix>.*\.mlp\.)(?P<member>gate|up)_proj\.(?P<suffix>weight|bias)$"),
)
_MEMBERS = {0: ("q", "k", "v"), 1: ("gate", "up")}


def fused_siblings(name: str, known: set[str] | dict) -> list[str]:
    """``name`` plus the members of its fused module that exist in ``known``."""
    for i, pattern in enumerate(_FUSED):
        m = pattern.match(name)
        if m:
            group = [f"{m['prefix']}{member}_proj.{m['suffix']}" for member in _MEMBERS[i]]
            return [g for g in group if g in known]
    return [name]


class HostDeltaCache:
    """What the dense path reads from experts, kept in host RAM (LRU by bytes, keyed by expert token and
    parameter): decoded float32 deltas for the merge loop, and sparse experts' kept entries (flat int64
    indices and stored values) for the add-in-place path — a DARE 1 % expert of SmolLM2 is ~16 MB of
    entries, and decoding them (Elias-Fano) took 0.35 s of a 0.6 s add per swap (measured)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = max(0, int(budget_bytes))
        self._items: OrderedDict[tuple[str, str, str], tuple[Tensor, ...]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, token: str, expert: Expert, name: str) -> Tensor:
        """``name``'s delta, decoded densely in float32."""
        return self._cached((token, name, "dense"), lambda: (expert.decode(name, dtype=torch.float32),))[0]

    def entries(self, token: str, expert: Expert, name: str) -> tuple[Tensor, Tensor]:
        """``name``'s kept entries of a sparse expert (``Expert.entries``)."""
        return self._cached((token, name, "entries"), lambda: expert.entries(name))

    def _cached(self, key: tuple[str, str, str], make) -> tuple[Tensor, ...]:
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
            self.hits += 1
            return hit
        self.misses += 1
        value = tuple(make())
        size = _nbytes(value)
        if size <= self.budget:
            self._items[key] = value
            self.bytes += size
            while self.bytes > self.budget:
                _, old = self._items.popitem(last=False)
                self.bytes -= _nbytes(old)
                self.evictions += 1
        return value

    def drop(self, token: str) -> None:
        for key in [k for k in self._items if k[0] == token]:
            self.bytes -= _nbytes(self._items.pop(key))
            self.evictions += 1


def _nbytes(tensors: tuple[Tensor, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class DeltaState:
    """Everything the extension keeps in the worker process."""

    def __init__(self, base_dir: str, host_cache_bytes: int) -> None:
        self.base_dir = Path(base_dir)
        self.base: dict[str, Tensor] = {}
        for path in sorted(self.base_dir.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():
                    self.base[key] = fh.get_tensor(key)
        if not self.base:
            raise FileNotFoundError(f"no *.safetensors weights in {self.base_dir}")
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
        return {s for n in names for s in fused_siblings(n, self.base)}

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
        densely and the stacked merge (one rank-8 LoRA of SmolLM2, offline: 4.4 s through the merge loop with
        its dense deltas cached, 0.35 s this way). Bit-identical to merged_params' task arithmetic
        ``base + (w_1 tau_1 + w_2 tau_2 + ...)``: one expert is added into a copy of the base (base + w v where kept, base + 0 elsewhere); several are first
        summed into a float32 zero tensor in the recipe's order (overlapping entries summed before the add;
        elsewhere 0 + w v is exactly w v). Measured offline on one DARE 1 % expert of SmolLM2 (1 thread):
        copy of the base 0.11-0.33 s, copy + add_into 0.57-0.67 s, copy + add of cached entries 0.16-0.26 s."""
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


def retie_output_embeddings(model: torch.nn.Module) -> bool:
    """With tied embeddings, a delta on ``embed_tokens`` is also one on the output projection.

    vLLM ties ``lm_head`` to ``embed_tokens`` when it loads the model, but an in-place reload only
    re-processes the layers it loaded weights into: on the CPU backend the head's GEMM keeps a copy
    packed from the *old* embedding (and the reload may even put the old tensor back on the head).
    So after a reload that touched the embeddings, tie the head to the current embedding weight
    again and re-run its post-load processing. Returns whether the model ties them."""
    config = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    modules = dict(model.named_modules())
    head = modules.get("lm_head")
    embed = next((m for n, m in modules.items() if n.endswith("embed_tokens")), None)
    if not config or head is None or embed is None:
        return False
    head.weight = embed.weight
    method = getattr(head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)
    return True


def watch_parent(pid: int, interval_s: float = 0.25) -> None:
    """Exit this engine process soon after the server process ``pid`` dies, even by kill -9.

    The worker runs under vLLM's EngineCore, which runs under the server. The kernel's
    parent-death signal kills this worker when EngineCore dies; a polling thread notices the
    server's death and takes EngineCore (recorded now, while it is our parent) down with it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    engine_core = os.getppid()

    def poll() -> None:
        while pid_alive(pid):
            time.sleep(interval_s)
        if engine_core not in (pid, 0, 1):
            with contextlib.suppress(OSError):
                os.kill(engine_core, signal.SIGKILL)
        os._exit(1)

    threading.Thread(target=poll, name="deltaserve-parent-watch", daemon=True).start()


class DeltaWorkerExtension:
    """Methods vLLM adds to its Worker; call them with ``collective_rpc("deltaserve_...")``."""

    def deltaserve_setup(self, base_dir: str, host_cache_bytes: int, server_pid: int | None = None) -> dict:
        """Load the host copy of the base; with ``server_pid``, exit when that process is gone."""
        self._deltaserve = DeltaState(base_dir, host_cache_bytes)
        if server_pid:
            watch_parent(server_pid)
        return {"base_params": len(self._deltaserve.base)}

    def deltaserve_apply(self, request: dict) -> dict:
        """Make the weights ``base + merge(request)`` (a ``MergeRequest`` dump); no items restores the base.

        Returns the swap's ``SwapStats`` dump.
        """
        state: DeltaState = self._deltaserve
        req = MergeRequest.model_validate(request)
        start = time.perf_counter()
        hits, misses, evictions = state.cache.hits, state.cache.misses, state.cache.evictions
        touched = {n for item in req.items for n in state.expert(item.path, item.token).param_names}
        missing = sorted(n for n in touched if n not in state.base)
        if missing:
            raise KeyError(f"expert parameters not in the base model: {missing[:5]}")
        targets = state.expand(touched)
        restore = state.expand(state.applied - targets) - targets
        phases: dict[str, float] = {}
        items = list(state.weights(req, targets, restore, phases))
        phases["merge"] = time.perf_counter() - start - phases["decode"]
        bytes_touched = sum(t.numel() * t.element_size() for _, t in items)
        try:
            loading = time.perf_counter()
            self.model_runner.reload_weights(weights_iterator=iter(items))
            phases["load"] = time.perf_counter() - loading
            if any(name.endswith("embed_tokens.weight") for name, _ in items):
                retie_output_embeddings(self.model_runner.get_model())
            phases["retie"] = time.perf_counter() - loading - phases["load"]
        except Exception:
            state.applied |= targets   # unknown state: the next apply rewrites all of it from the base
            raise
        state.applied = targets
        return SwapStats(key=req.key, seconds=time.perf_counter() - start, bytes=bytes_touched, params=len(items),
                         host_hits=state.cache.hits - hits, host_misses=state.cache.misses - misses,
                         host_evictions=state.cache.evictions - evictions,
                         host_bytes=state.cache.bytes, phases=phases).model_dump()

    def deltaserve_forget(self, token: str) -> dict:
        """Drop an expert's decoded deltas (it was deleted or replaced)."""
        state: DeltaState = self._deltaserve
        state.cache.drop(token)
        state.experts.pop(token, None)
        return {"host_bytes": state.cache.bytes}
