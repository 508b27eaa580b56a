"""What every benchmark shares: provenance, store seeding, traffic to a live server, copy bandwidth.

* ``provenance()`` is the one record every ``results/`` file carries: command,
  git commit (with ``+dirty`` / ``+uncommitted-bench``), date, python, torch,
  CPU count and platform.
* ``seed_store`` imports the zoo's experts into an expert store (resumable).
* ``post_chats`` / ``scrape`` / ``p99`` drive a running ``deltaserve serve``
  (started with ``bench.servers``) and read its metrics.
* ``best_seconds`` / ``copy_bandwidth`` time a call and the device's memory copy.
"""

from __future__ import annotations

import asyncio
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deltaserve.experts.sources import Compression
    from deltaserve_zoo.real.build import RealSuiteBuilder
    from deltaserve_zoo.spec import ZooSpec

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- provenance


def provenance(command: str | None = None, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The provenance record of a results file: ``command`` (default: this process's, see
    ``command_line``), ``git_commit``, ``date`` (UTC), ``python``, ``torch``, ``cpus``, ``platform``."""
    import torch

    return {"command": command or command_line(argv), "git_commit": git_commit(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "platform": platform.platform()}


def command_line(argv: Sequence[str] | None = None) -> str:
    """This process's command line, e.g. ``.venv/bin/python -m bench.quality.tables --suite llm``:
    the interpreter and script relative to the working directory; ``argv`` replaces ``sys.argv[1:]``
    (for a ``main(argv)`` called from Python)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = ["-m", spec.name] if spec is not None else [_relative(sys.argv[0])]
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join([_relative(sys.executable), *program, *args])


def _relative(path: str) -> str:
    try:
        return str(Path(path).absolute().relative_to(Path.cwd()))
    except ValueError:
        return path


def git_commit(repo: Path = REPO) -> str:
    """HEAD's full hash, plus ``+dirty`` when a tracked file outside ``bench/`` and ``results/``
    differs from HEAD, plus ``+uncommitted-bench`` when a file under ``bench/`` does (new files
    included); ``unknown`` outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        bench = git("status", "--porcelain", "--", "bench")
        other = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench",
                    ":(exclude)results")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if other else "") + ("+uncommitted-bench" if bench else "")


def log(message: str) -> None:
    """A progress line with the wall-clock time, flushed (long runs are watched through a log file)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------- expert stores


def expert_name(task: str) -> str:
    """Store name of a zoo task's full fine-tune: ``count_vowels`` -> ``count-vowels``."""
    return task.replace("_", "-")


def lora_name(task: str) -> str:
    """Store name of a zoo task's LoRA expert."""
    return f"{expert_name(task)}-lora"


def seed_store(zoo: Path, store: Path, tasks: Sequence[str], full: Mapping[str, Compression] | None = None,
               lora_exemplars: Callable[[str], list[str]] | None = None) -> None:
    """Import the zoo's experts of ``tasks`` into the store at ``store``, per task: the LoRA adapter as
    ``lora_name(task)`` (exact; with ``lora_exemplars(task)`` when given), then the full fine-tune
    once per ``full`` entry ``{suffix: compression}`` as ``expert_name(task) + suffix``. Names
    already in the store are kept, so a rerun resumes."""
    from deltaserve.experts.store import ExpertStore
    from deltaserve_zoo.build import ZooLayout

    layout = ZooLayout(zoo)
    experts = ExpertStore(store, layout.base)
    for task in tasks:
        if lora_name(task) not in experts.names():
            exemplars = lora_exemplars(task) if lora_exemplars else None
            experts.import_source(lora_name(task), layout.lora(task), exemplars=exemplars)
        for suffix, compression in (full or {}).items():
            if expert_name(task) + suffix not in experts.names():
                experts.import_source(expert_name(task) + suffix, layout.full(task), compression=compression)


def built_real_suite(root: Path | None = None) -> RealSuiteBuilder:
    """The real suite under ``root`` (default ``.cache/zoo/real``), or exit saying how to build it."""
    from deltaserve_zoo.real.build import RealSuiteBuilder

    root = Path(root) if root is not None else REPO / ".cache" / "zoo" / "real"
    builder = RealSuiteBuilder(root)
    missing = builder.missing()
    if missing:
        raise SystemExit(f"the real suite is not built under {root} (missing {missing[:3]}); "
                         "run `deltaserve zoo build --size real`")
    return builder


def zoo_spec(zoo: Path) -> ZooSpec:
    """The spec of the zoo built at ``zoo`` (its ``spec.json``)."""
    from deltaserve_zoo.spec import ZooSpec

    return ZooSpec.model_validate_json((Path(zoo) / "spec.json").read_text())


# ---------------------------------------------------------------------------- a live server


async def post_chats(url: str, jobs: Sequence[tuple[Any, dict]], concurrency: int,
                     timeout_s: float = 600) -> tuple[list[tuple[Any, dict, float]], float]:
    """POST every ``(key, body)`` of ``jobs`` to ``/v1/chat/completions``, ``concurrency`` in flight.
    Returns ``[(key, response JSON, latency s)]`` in completion order and the wall seconds of the
    whole batch. A non-200 answer ends the run (``SystemExit`` with the model and the body)."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    done: list[tuple[Any, dict, float]] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            key, body = queue.get_nowait()
            start = time.perf_counter()
            r = await client.post("/v1/chat/completions", json=body)
            latency = time.perf_counter() - start
            if r.status_code != 200:
                raise SystemExit(f"{body.get('model')!r} on {body.get('messages')!r}: HTTP {r.status_code} "
                                 f"{r.text[:500]}")
            done.append((key, r.json(), latency))

    async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return done, wall


def scrape(url: str, headers: dict[str, str] | None = None) -> dict[str, float]:
    """The server's ``/metrics`` as ``{series: value}`` (comments dropped)."""
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics", headers=headers).text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def p99(values: Sequence[float]) -> float:
    """The 99th percentile as ``statistics.quantiles(n=100)`` computes it (the value itself for one sample)."""
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else values[0]


# ---------------------------------------------------------------------------- timing


def best_seconds(fn: Callable[[], object], device: str = "cpu", repeat: int = 5) -> float:
    """Best wall time of ``repeat`` calls of ``fn`` after one warm-up call (CUDA synchronised)."""
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth(nbytes: int, device: str = "cpu", repeat: int = 5) -> float:
    """Memory copy bandwidth of ``device`` in GB/s: ``dst.copy_(src)`` of an ``nbytes`` buffer,
    counting the read and the write (2 x nbytes per copy)."""
    import torch

    src = torch.empty(max(1, nbytes // 4), dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / best_seconds(lambda: dst.copy_(src), device, repeat) / 1e9
