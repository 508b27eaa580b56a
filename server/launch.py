"""Run ``deltaserve serve`` as a subprocess and wait until it is healthy: what the tests and the
benchmarks (and anyone scripting a server) use, one implementation."""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# lines that name why a process died: exceptions, errors, signals, the OOM killer
ROOT_CAUSE = re.compile(r"(Error|Exception|Killed|killed|signal|SIG[A-Z]+|died|exit code)")
QUIET_ENV = {"VLLM_LOGGING_LEVEL": "WARNING", "TQDM_DISABLE": "1"}


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999    # Linux's default


def machine_state() -> str:
    """What a failed start may have run out of: available memory, free shared memory (vLLM's queues and
    the CPU all-reduce live in /dev/shm), the CPUs this process may use."""
    import shutil

    parts = []
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        parts.append(f"MemAvailable {meminfo['MemAvailable'].strip()}")
    except (OSError, KeyError, ValueError):
        pass
    try:
        shm = shutil.disk_usage("/dev/shm")
        parts.append(f"/dev/shm {shm.free >> 20} MiB free of {shm.total >> 20} MiB")
    except OSError:
        pass
    if hasattr(os, "sched_getaffinity"):
        parts.append(f"cpus {sorted(os.sched_getaffinity(0))}")
    return ", ".join(parts)


def free_port() -> int:
    """A free TCP port below the OS's ephemeral range. The server binds it only after vLLM's engine has
    started (20-60 s), and the engine opens its own sockets on OS-assigned (ephemeral) ports meanwhile: a port
    taken from that range (``bind(0)``) was taken again by one of them once (``address already in use``,
    the server exiting before it was healthy). Ports below the range are never assigned that way."""
    low, _ = _ephemeral_range()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:     # everything tried was taken: fall back to the OS's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``deltaserve serve --base BASE --store STORE --port <free> ARGS`` with its output in ``log``."""

    def __init__(self, base: Path, store: Path, log: Path, args: list[str] | None = None,
                 env: dict[str, str] | None = None, timeout_s: float = 300.0, wait: bool = True) -> None:
        """Start the server; with ``wait`` (the default) return once it is healthy, else call ``wait_healthy``."""
        self.base, self.store, self.log_path = Path(base), Path(store), Path(log)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "deltaserve.server.cli", "serve", "--base", str(base), "--store", str(store),
               "--port", str(self.port), *(args or [])]
        full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **QUIET_ENV, **(env or {})}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_healthy(timeout_s)

    def wait_healthy(self, timeout_s: float = 300.0) -> None:
        """Return once ``/health`` answers 200; raise with the log's tail if the server exits or times out."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"deltaserve exited with {self.proc.returncode}:\n{self.failure_report()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"deltaserve not healthy after {timeout_s:.0f} s:\n{self.failure_report()}")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def failure_report(self, causes: int = 12, tail: int = 40) -> str:
        """The log's error lines first (a worker's root cause is often far above the tail, under the
        engine's own traceback), then its tail."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        found = [line for line in lines if ROOT_CAUSE.search(line) and not line.lstrip().startswith("File ")]
        first = list(dict.fromkeys(found))[:causes]
        return (f"machine: {machine_state()}\nroot cause candidates:\n" + "\n".join(first)
                + "\n--- log tail:\n" + "\n".join(lines[-tail:]))

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
