"""The real suite's experts, trained one after another and registered with a running deltaserve as each is
ready, through the server's own admin API (``POST /v1/experts``): what ``deltaserve demo`` runs beside the
server, so the base answers at once and ``/v1/models`` and ``auto`` grow while the user watches.

Per skill, in the suite's order: the PEFT LoRA (kept exact) and the full fine-tune (DARE-compressed to
``DEMO_COMPRESSION``), each with exemplar prompts for the router and calibration examples the server
measures it on (its calibration score). Two single-threaded trainings run at a time; an expert already in
the server's store is not trained again (its artifact is cached under the suite's root) nor registered
again. ``publish_all`` registers into a store directly, for benchmarks that need the experts without a
server.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from deltaserve_zoo.real.build import RealSuiteBuilder, _expert_job
from deltaserve_zoo.real.skills import get_skill
from deltaserve_zoo.real.spec import RealSuiteSpec

EXEMPLARS_PER_SKILL = 48
CALIBRATION_PER_SKILL = 64
#: The compressor and density the real-suite compression table justifies (docs/results.md; results/quality/real).
DEMO_COMPRESSION = {"method": "dare", "density": 0.01}
KINDS = ("lora", "full")


def expert_names(skill: str) -> tuple[str, str]:
    """(LoRA expert, compressed full fine-tune) store names of a skill."""
    name = skill.replace("_", "-")
    return f"{name}-lora", name


def expert_name(kind: str, skill: str) -> str:
    return expert_names(skill)[KINDS.index(kind)]


def registration(builder: RealSuiteBuilder, kind: str, skill: str, exemplars: int = EXEMPLARS_PER_SKILL,
                 calibration: int = CALIBRATION_PER_SKILL) -> dict[str, Any]:
    """The ``POST /v1/experts`` body of one expert of the suite (its artifact must be built)."""
    s = get_skill(skill)
    body: dict[str, Any] = {
        "name": expert_name(kind, skill),
        "path": str(builder.layout.lora(skill) if kind == "lora" else builder.layout.full(skill)),
        "exemplars": [e.question for e in s.examples("calib", exemplars, seed=1)],
        "calibration": [e.to_json() for e in s.examples("calib", calibration)],
    }
    if kind == "full":
        body["compression"] = {**DEMO_COMPRESSION, "task": skill}
    return body


def describe(card: dict[str, Any]) -> str:
    """One line for people: what an expert is and how well it answers its calibration examples."""
    what = "LoRA, exact" if card["kind"] == "lora" else f"{card['codec']}, {card['bits_per_param']:.2f} bits/param"
    quality = card.get("calibration") or {}
    if quality:
        what += (f"; on {quality['examples']} calibration examples: exact match {quality['exact']:.0%}, "
                 f"token accuracy {quality['token_accuracy']:.0%}")
    return f"{card['id']} ({what})"


class LivePublisher:
    """Trains the suite's missing experts and registers each with the server at ``url`` once it is healthy."""

    def __init__(self, root: Path, url: str, admin_key: str | None = None, workers: int = 2,
                 log: Callable[[str], None] = print, spec: RealSuiteSpec | None = None,
                 examples: tuple[int, int] = (EXEMPLARS_PER_SKILL, CALIBRATION_PER_SKILL)) -> None:
        self.builder = RealSuiteBuilder(root, spec, log=lambda _message: None)
        self.url, self.workers, self.log, self.examples = url.rstrip("/"), workers, log, examples
        self.headers = {"authorization": f"Bearer {admin_key}"} if admin_key else {}

    def jobs(self, registered: set[str]) -> list[tuple[str, str]]:
        """(kind, skill) of every expert the server does not have yet, first skill first, its LoRA first."""
        return [(k, s) for s in self.builder.spec.skills for k in KINDS if expert_name(k, s) not in registered]

    def run(self) -> int:
        """Train and register everything missing; returns how many experts were registered."""
        import httpx

        started = time.perf_counter()
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=600) as client:
            self._wait_healthy(client)
            jobs = self.jobs({e["id"] for e in client.get("/v1/experts").json()["data"]})
            if not jobs:
                return 0
            missing = set(self.builder.missing())
            train = sum(f"{kind}:{skill}" in missing for kind, skill in jobs)
            self.log(f"experts: {len(jobs)} to register, {train} of them trained first in the background "
                     f"({self.workers} at a time); each is registered as soon as it is ready: watch GET /v1/experts")
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx) as pool:
                futures = [(job, pool.submit(_expert_job, self.builder.layout.root, self.builder.spec, *job))
                           for job in jobs]
                for n, ((kind, skill), future) in enumerate(futures, 1):
                    self._register(client, kind, skill, future, n, len(jobs), started)
        self.log(f"experts: all {len(jobs)} registered, {(time.perf_counter() - started) / 60:.1f} min; the suite's "
                 "accuracy matrix through vLLM: deltaserve zoo build --size real")
        return len(jobs)

    def _register(self, client: Any, kind: str, skill: str, future: Future, n: int, total: int,
                  started: float) -> None:
        """Wait for one expert's training (in the order submitted) and register it."""
        future.result()
        response = client.post("/v1/experts", json=registration(self.builder, kind, skill, *self.examples))
        if response.status_code != 201:
            raise RuntimeError(f"registering {expert_name(kind, skill)} failed: {response.status_code} "
                               f"{response.text}")
        elapsed = (time.perf_counter() - started) / 60
        self.log(f"experts: [{n}/{total}, {elapsed:.1f} min] registered {describe(response.json())}")

    def _wait_healthy(self, client: Any, timeout_s: float = 900) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if client.get("/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"the server at {self.url} did not become healthy in {timeout_s:.0f} s")


def publish_all(builder: RealSuiteBuilder, store_dir: Path, log: Callable[[str], None] = print) -> Path:
    """Register every expert of a built suite into the store at ``store_dir`` directly (no server), skipping
    those it has; returns the base directory. The same bodies the live publisher posts."""
    from deltaserve.experts.examples import ChatExample
    from deltaserve.experts.sources import Compression, compression_helpers
    from deltaserve.experts.store import ExpertStore

    store = ExpertStore(store_dir, builder.layout.base)
    have = set(store.names())
    for skill in builder.spec.skills:
        for kind in KINDS:
            body = registration(builder, kind, skill)
            if body["name"] in have:
                continue
            compression = Compression(**body["compression"]) if "compression" in body else None
            calibration = [ChatExample.from_json(e) for e in body["calibration"]]
            objective, _ = compression_helpers(builder.layout.base, None, None, calibration)
            m = store.import_source(body["name"], Path(body["path"]), compression=compression,
                                    exemplars=body["exemplars"], objective=objective)
            log(f"published {body['name']} ({m.codec}, {m.bits_per_param:.2f} bits/param)")
    return builder.layout.base
