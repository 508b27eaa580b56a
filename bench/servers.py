"""Start and stop a real ``deltaserve serve`` for the benchmarks (server.launch, the tests' launcher too)."""

from __future__ import annotations

from pathlib import Path

from deltaserve.server.launch import ServerProcess


def start_server(base: Path, store: Path, log: Path, extra: list[str] | None = None,
                 timeout_s: int = 600, env: dict[str, str] | None = None,
                 wait: bool = True) -> tuple[ServerProcess, str]:
    """Launch on a free port; return once ``/health`` answers 200 (or exit with the log's tail); ``wait=False``
    returns at once (call ``wait_healthy``), e.g. to start several replicas side by side."""
    try:
        server = ServerProcess(base, store, log, ["--log-level", "warning", *(extra or [])],
                               env={"VLLM_CPU_KVCACHE_SPACE": "2", **(env or {})}, timeout_s=timeout_s, wait=wait)
    except RuntimeError as err:
        raise SystemExit(str(err)) from None
    return server, server.url


def stop_server(server: ServerProcess) -> None:
    server.stop()
