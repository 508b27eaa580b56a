"""The vLLM worker extension of the dense path: W = W_base + sum_i w_i * decode(tau_i), in place.

vLLM mixes ``DeltaWorkerExtension`` into its Worker (``worker_extension_cls``)
and the engine calls its methods with ``collective_rpc``; they run in the
worker process (on every rank), next to the weights. What the worker keeps and
how a recipe's tensors are computed: server.worker.state.

Weights go through ``model_runner.reload_weights(weights_iterator=...)``: it
runs the model's own loader (name mapping, q/k/v and gate/up fusion, the CPU
backend's weight repacking), so it works on vLLM-CPU and on GPU alike.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import threading
import time
from typing import Any

import torch

from deltaserve.experts.atomic import pid_alive
from deltaserve.server.engine.contracts import MergeRequest, SwapStats
from deltaserve.server.vllm_patches import apply_vllm_patches, patched_targets
from deltaserve.server.worker.layout import lora_names, probe_layout
from deltaserve.server.worker.loading import keep_plain_weights, keeps_plain_weights, load
from deltaserve.server.worker.state import DeltaState


class UntouchedLayers(logging.Filter):
    """A recipe's swap reloads only the layers it changes; vLLM warns "<Layer>: Failed to load weights" for
    every other layer on every swap (and for the rotary embedding and the tied head, which have no weights of
    their own). Those layers keep their weights, as intended: the lines are dropped."""

    LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
    RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.inplace"   # "... were not loaded from checkpoint"

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "Failed to load weights" not in message and "were not loaded from checkpoint" not in message


_UNTOUCHED = UntouchedLayers()


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

    model_runner: Any   # the Worker's, which this class is mixed into (declared only: vLLM refuses name clashes)

    def deltaserve_setup(self, base_dir: str, host_cache_bytes: int, server_pid: int | None = None,
                         plain_weights: bool = False) -> dict:
        """Open the base's files; fix vLLM-CPU's LoRA ops where this platform and version need it
        (server.vllm_patches: nothing elsewhere); with ``server_pid``, exit when that process is gone; with
        ``plain_weights``, make vLLM-CPU keep plain linear weights (server.worker.loading: the in-place swap
        path, as on a GPU). The fixes are applied after the model loaded, which is in time with
        ``enforce_eager`` (the default): the ops run eagerly at every step. Returns what this rank runs."""
        state = self._deltaserve = DeltaState(base_dir, host_cache_bytes)
        for name in (UntouchedLayers.LOGGER, UntouchedLayers.RELOAD_LOGGER):
            logging.getLogger(name).addFilter(_UNTOUCHED)
        apply_vllm_patches()
        if plain_weights:
            keep_plain_weights(self.model_runner, state.base)
        model = self.model_runner.get_model()
        state.mode = "in_place" if keeps_plain_weights(model) else "reload"
        state.layout = probe_layout(model, state.base)
        if server_pid:
            watch_parent(server_pid)
        return {"rank": getattr(self, "rank", 0), "base_params": len(state.base), "swap": state.mode,
                "vllm_patches": patched_targets(), "model": type(model).__name__,
                "lora_names": lora_names(self.model_runner, state.layout)}

    def deltaserve_apply(self, request: dict) -> dict:
        """Make the weights ``base + merge(request)`` (a ``MergeRequest`` dump); no items restores the base.

        Returns the swap's ``SwapStats`` dump.
        """
        state: DeltaState = self._deltaserve
        req = MergeRequest.model_validate(request)
        start = time.perf_counter()
        hits, misses, evictions = state.cache.hits, state.cache.misses, state.cache.evictions
        touched = {n for item in req.items for n in state.expert(item.path, item.token).param_names}
        missing = sorted(n for n in touched if n not in state.base) or state.layout.unloadable(touched)
        if missing:
            raise KeyError(f"expert parameters the base model does not load: {missing[:5]}")
        targets = state.expand(touched)
        restore = state.expand(state.applied - targets) - targets
        phases: dict[str, float] = {}
        items = list(state.weights(req, targets, restore, phases))
        phases["merge"] = time.perf_counter() - start - phases["decode"]
        bytes_touched = sum(t.numel() * t.element_size() for _, t in items)
        try:
            loading = time.perf_counter()
            load(self.model_runner, items, state.mode, state.layout.modules_of(name for name, _ in items))
            phases["load"] = time.perf_counter() - loading
            if any(name.endswith("embed_tokens.weight") for name, _ in items):
                retie_output_embeddings(self.model_runner.get_model())
            phases["retie"] = time.perf_counter() - loading - phases["load"]
        except Exception:
            state.applied |= targets   # unknown state: the next apply rewrites all of it from the base
            raise
        state.applied = targets
        return SwapStats(key=req.key, mode=state.mode, seconds=time.perf_counter() - start, bytes=bytes_touched,
                         params=len(items),
                         host_hits=state.cache.hits - hits, host_misses=state.cache.misses - misses,
                         host_evictions=state.cache.evictions - evictions,
                         host_bytes=state.cache.bytes, phases=phases).model_dump()

    def deltaserve_forget(self, token: str) -> dict:
        """Drop an expert's decoded deltas (it was deleted or replaced)."""
        state: DeltaState = self._deltaserve
        state.cache.drop(token)
        state.experts.pop(token, None)
        return {"host_bytes": state.cache.bytes}
