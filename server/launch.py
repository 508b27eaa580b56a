"""Run ``deltaserve serve`` as a subprocess and wait until it is healthy: what the tests and the
benchmarks (and anyone scripting a server) use, one implementation."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUIET_ENV = {"VLLM_LOGGING_LEVEL": "WARNING", "TQDM_DISABLE": "1"}


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999    # Linux's default


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
                 env: dict[str, str] | None = None, timeout_s: float = 300.0) -> None:
        self.base, self.store, self.log_path = Path(base), Path(store), Path(log)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "deltaserve.server.cli", "serve", "--base", str(base), "--store", str(store),
               "--port", str(self.port), *(args or [])]
        full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **QUIET_ENV, **(env or {})}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)
        self.wait_healthy(timeout_s)

    def wait_healthy(self, timeout_s: float = 300.0) -> None:
        """Return once ``/health`` answers 200; raise with the log's tail if the server exits or times out."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"deltaserve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"deltaserve not healthy after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
