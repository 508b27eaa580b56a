"""What the tests share besides fixtures (tests/conftest.py): paths, keys, a live server class, store seeding."""

from __future__ import annotations

import os
from pathlib import Path

from deltaserve.server.launch import ServerProcess, free_port  # noqa: F401  (free_port: the Prometheus tests use it)

REPO = Path(__file__).resolve().parents[1]
# Tests share one cached micro zoo; the build is skipped when its spec is unchanged.
MICRO_ZOO = Path(os.environ.get("DELTASERVE_TEST_ZOO", REPO / ".cache" / "zoo" / "micro"))
REAL_ROOT = REPO / ".cache" / "zoo" / "real"
API_KEY, ADMIN_KEY = "test-inference-key", "test-admin-key"
SERVER_START_TIMEOUT_S = 300


class LiveServer(ServerProcess):
    """A ``deltaserve serve`` subprocess (the real vLLM-CPU engine) with the tests' keys.

    Adaptive merging is off unless ``extra`` turns it on, so each test's paths are its own requests'
    (tests/test_adaptive.py turns it on). Start it through the ``start_server`` fixture (or a session
    fixture), which stops it and marks the test ``engine``."""

    def __init__(self, base: Path, store: Path, log: Path, extra: list[str] | None = None,
                 roots: tuple[Path, ...] = (), keys: bool = True, wait: bool = True) -> None:
        args = [*(["--api-key", API_KEY, "--admin-key", ADMIN_KEY] if keys else []), "--register-root", str(MICRO_ZOO),
                "--register-root", str(store.parent), *(a for root in roots for a in ("--register-root", str(root))),
                "--max-wait-ms", "50", "--store-poll-s", "0.5", "--log-level", "warning", "--adaptive-merge", "off",
                *(extra or [])]
        super().__init__(base, store, log, args, timeout_s=SERVER_START_TIMEOUT_S, wait=wait)

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


# Exemplars of the experts the docs' examples name (what the random experts learned does not matter to whether a
# request is served; the exemplars give `auto` something to route to).
ISO_DATE = ["Convert 14 July 2019 to ISO 8601 format.", "Give the ISO date for August 21, 2018."]
SQL = ["Write the SQL that counts the orders of customer 7.", "Give me the SQL that would count the orders."]
JSON = ["Turn into JSON with name, age, job and city: Ana, 31, is a nurse in Lyon."]


def seed_real_store(base: Path, store: Path, work: Path) -> dict[str, Path]:
    """Random experts on the real base (nothing trained): LoRAs (LoRA path) and sparse task vectors on embeddings,
    attention and MLP (dense path) — ``random-*`` for the serving tests, and the names the docs' examples use,
    with exemplars; returns each expert's source folder."""
    from deltaserve.experts.store import ExpertStore
    from deltaserve_zoo.real.synthetic import publish_synthetic, random_lora, random_sparse_expert

    s = ExpertStore(store, base)
    sources = {"random-lora": random_lora(base, work / "lora"), "random-lora-2": random_lora(base, work / "lora-2",
                                                                                             seed=1),
               "random-sparse": random_sparse_expert(base, work / "sparse"),
               "random-sparse-2": random_sparse_expert(base, work / "sparse-2", density=0.01, seed=2,
                                                       name="random-sparse-2")}
    for name, source in sources.items():
        s.import_source(name, source)
    loras = {"iso-date-lora": ISO_DATE, "sql-lora": SQL, "json-extract": JSON}
    for seed, (name, exemplars) in enumerate(loras.items()):
        sources[name] = random_lora(base, work / name, seed=10 + seed)
        s.import_source(name, sources[name], exemplars=exemplars)
    for seed, (name, exemplars) in enumerate({"iso-date": ISO_DATE, "sql": SQL}.items()):
        sources[name] = random_sparse_expert(base, work / name, density=0.01, seed=11 + seed, name=name)
        s.import_source(name, sources[name], exemplars=exemplars)
    publish_synthetic(base, store, work / "synthetic")     # the serving benchmark's (tests/test_gpu_script.py)
    return sources
