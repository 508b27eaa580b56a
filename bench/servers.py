"""Start and stop a real ``deltaserve serve`` subprocess for the benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def start_server(base: Path, store: Path, log: Path, extra: list[str] | None = None,
                 timeout_s: int = 600) -> tuple[subprocess.Popen, str]:
    """Launch on a free port; return once ``/health`` answers 200 (or exit with the log's tail)."""
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "VLLM_CPU_KVCACHE_SPACE": "2", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "server.cli", "serve", "--base", str(base), "--store", str(store),
           "--port", str(port), "--log-level", "warning", *(extra or [])]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(timeout_s):
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit("server did not become healthy")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
