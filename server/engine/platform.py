"""What vLLM needs and can do for this base on this platform, asked before the engine starts: the arguments
of tensor parallelism (and vLLM-CPU's per-rank cores) and whether vLLM can run LoRA on the model at all."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def parallel_args(tensor_parallel_size: int, cores: list[int] | None = None) -> dict[str, Any]:
    """vLLM's arguments for ``tensor_parallel_size`` ranks: one process per rank (the ``mp`` executor); on
    vLLM-CPU each rank needs its own cores, so ``VLLM_CPU_OMP_THREADS_BIND`` is set (unless it is) to
    ``tensor_parallel_size`` groups of the cores this process may use, and the ranks' gloo groups talk over
    the loopback interface (``GLOO_SOCKET_IFNAME``, unless set): they are processes of this host, and gloo
    otherwise takes the interface of the address the host name resolves to. A preset binding must give one
    group of cores per rank (vLLM would stop on an assertion)."""
    if tensor_parallel_size == 1:
        return {}
    from deltaserve.server.vllm_compat import current_platform

    if current_platform.is_cpu():
        given = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "")
        if not given:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(tensor_parallel_size, cores)
        elif given not in ("auto", "nobind") and len(given.split("|")) != tensor_parallel_size:
            raise ValueError(f"VLLM_CPU_OMP_THREADS_BIND={given!r} gives {len(given.split('|'))} group(s) of cores "
                             f"and --tensor-parallel-size is {tensor_parallel_size}: give one group per rank "
                             f"(e.g. {cpu_thread_binding(tensor_parallel_size, cores)!r}) or unset it")
        loopback = loopback_interface()
        if loopback and not os.environ.get("GLOO_SOCKET_IFNAME"):
            os.environ["GLOO_SOCKET_IFNAME"] = loopback
    return {"tensor_parallel_size": tensor_parallel_size, "distributed_executor_backend": "mp"}


def cpu_thread_binding(ranks: int, cores: list[int] | None = None) -> str:
    """``ranks`` groups of ``cores`` (default: this process's) in vLLM-CPU's ``0-3|4-7`` form."""
    cores = sorted(os.sched_getaffinity(0)) if cores is None else sorted(cores)
    per = len(cores) // ranks
    if per < 1:
        raise ValueError(f"tensor_parallel_size {ranks} needs at least {ranks} cores; this process may use "
                         f"{len(cores)}")
    groups = [cores[i * per:(i + 1) * per] for i in range(ranks)]
    return "|".join(f"{g[0]}-{g[-1]}" if g == list(range(g[0], g[-1] + 1)) and len(g) > 1 else ",".join(map(str, g))
                    for g in groups)

def loopback_interface() -> str | None:
    """The name of this host's loopback network interface (``lo`` on Linux), None if it has none."""
    import socket

    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((n for n in names if n == "lo"), next((n for n in names if n.startswith("lo")), None))


def lora_unavailable(base_dir: Path | str) -> str:
    """Why vLLM cannot run LoRA on this base here ("" when it can), from vLLM's own tables: the model class
    vLLM resolves for the checkpoint must support LoRA (``SupportsLoRA``), and a mixture-of-experts model's
    LoRA kernels are Triton kernels (vLLM-CPU without Triton fails at start with LoRA enabled)."""
    from deltaserve.server.vllm_compat import HAS_TRITON, AsyncEngineArgs, ModelRegistry, supports_lora

    model_config = AsyncEngineArgs(model=str(base_dir)).create_model_config()
    cls, arch = ModelRegistry.resolve_model_cls(model_config.architectures, model_config)
    if not supports_lora(cls):
        return f"vLLM does not support LoRA for {arch}"
    if model_config.is_moe and not HAS_TRITON:
        return (f"vLLM runs LoRA on {arch}'s mixture-of-experts layers with Triton kernels, and this platform "
                "has no Triton")
    return ""
