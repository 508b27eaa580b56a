"""Build the real suite: SmolLM2-135M-Instruct base, a full and a LoRA expert per skill, the matrix.

    from deltaserve_zoo.real.build import RealSuiteBuilder
    matrices = RealSuiteBuilder(".cache/zoo/real").build(workers=2)   # under `if __name__ == "__main__":`

Like the toy zoo (``zoo/build.py``), every artifact is a directory with a
``zoo-artifact.json`` holding its cache key; a build skips artifacts whose key
matches and writes the others to a temporary sibling that is renamed into place
(an interrupted build never leaves half an expert). Experts are trained in
spawned single-threaded processes (``workers`` at a time), so their weights do
not depend on ``workers``. The matrix is scored through vLLM (``zoo.real.evaluate``).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from deltaserve.experts.atomic import atomic_dir, write_json_atomic
from deltaserve_zoo.build import ARTIFACT_FILE
from deltaserve_zoo.matrix import AccuracyMatrix
from deltaserve_zoo.real.base import GGUF_PIP, convert_gguf
from deltaserve_zoo.real.spec import RealSuiteSpec

DEFAULT_ROOT = Path(".cache/zoo/real")
# Wall-clock seconds per artifact measured on the 2-core dev machine (a fresh clone's first build,
# results/real_suite/demo-first-run.json), for the estimate; experts: mean over the six skills,
# trained two at a time with one thread each.
ESTIMATE_S = {"base": 15, "full": 130, "lora": 100, "matrix": 335}


@dataclass(frozen=True)
class RealLayout:
    """Where each artifact of the real suite lives under its root directory."""

    root: Path

    @property
    def base(self) -> Path:
        return self.root / "base"

    def full(self, skill: str) -> Path:
        return self.root / "experts" / "full" / skill

    def lora(self, skill: str) -> Path:
        return self.root / "experts" / "lora" / skill

    @property
    def matrix(self) -> Path:
        return self.root / "matrix"


def is_cached(path: Path, key: str) -> bool:
    marker = Path(path) / ARTIFACT_FILE
    return marker.is_file() and json.loads(marker.read_text()).get("key") == key


def build_artifact(path: Path, key: str, info: dict, make: Callable[[Path], dict | None]) -> bool:
    """Build ``path`` with ``make(tmp_dir)`` unless its key matches; True if it was built."""
    if is_cached(path, key):
        return False
    started = time.perf_counter()
    with atomic_dir(path) as tmp:
        extra = make(tmp) or {}
        record = {"key": key, **info, **extra, "build_seconds": round(time.perf_counter() - started, 2)}
        write_json_atomic(tmp / ARTIFACT_FILE, record)
    return True


class RealSuiteBuilder:
    def __init__(self, root: Path = DEFAULT_ROOT, spec: RealSuiteSpec | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.spec = spec or RealSuiteSpec()
        self.layout = RealLayout(Path(root))
        self.log = log
        self.timings: dict[str, float] = {}

    # -- keys -------------------------------------------------------------
    def base_key(self) -> str:
        return hashlib.sha256(f"{self.spec.key()}|{GGUF_PIP}".encode()).hexdigest()[:16]

    def expert_key(self, kind: str, skill: str) -> str:
        return hashlib.sha256(f"{self.spec.key(kind)}|{self.base_key()}|{skill}".encode()).hexdigest()[:16]

    def matrix_key(self) -> str:
        keys = [self.base_key()] + [self.expert_key(k, s) for s in self.spec.skills for k in ("full", "lora")]
        blob = json.dumps([keys, self.spec.key("eval_examples", "max_model_len")])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def missing(self) -> list[str]:
        """Artifacts a build would make now: 'base', 'full:<skill>', 'lora:<skill>', 'matrix'."""
        out = [] if is_cached(self.layout.base, self.base_key()) else ["base"]
        for kind in ("full", "lora"):
            out += [f"{kind}:{s}" for s in self.spec.skills
                    if not is_cached(self._path(kind, s), self.expert_key(kind, s))]
        return out + ([] if is_cached(self.layout.matrix, self.matrix_key()) else ["matrix"])

    def estimate_seconds(self, workers: int = 2) -> float:
        """Rough wall time of what is missing (experts: ``workers`` one-thread trainings at a time, at most
        one per core, see build_experts)."""
        todo = [name.partition(":")[0] for name in self.missing()]
        experts = sum(ESTIMATE_S[k] for k in todo if k in ("full", "lora"))
        parallel = max(1, min(workers, len(os.sched_getaffinity(0))))
        return sum(ESTIMATE_S[k] for k in todo if k in ("base", "matrix")) + experts / parallel

    def _path(self, kind: str, skill: str) -> Path:
        return self.layout.full(skill) if kind == "full" else self.layout.lora(skill)

    # -- artifacts --------------------------------------------------------
    def build_base(self) -> None:
        def make(tmp: Path) -> dict:
            from deltaserve.experts.taskvector import base_fingerprint

            info = convert_gguf(tmp)
            return {**info, "base_fingerprint": base_fingerprint(tmp)}

        info = {"kind": "base", "model": "SmolLM2-135M-Instruct", "dtype": "float32"}
        if self._timed("base", lambda: build_artifact(self.layout.base, self.base_key(), info, make)):
            self.log(f"built base -> {self.layout.base} ({self.timings['base']:.0f} s)")

    def build_expert(self, kind: str, skill: str, progress: bool = True) -> bool:
        """Train and save one expert in this process (if its key is not cached)."""
        from deltaserve_zoo.real import train

        spec = self.spec.full if kind == "full" else self.spec.lora
        base = self.layout.base

        def make(tmp: Path) -> dict:
            if kind == "full":
                model, tokenizer, loss = train.train_full(base, skill, spec, self.spec.seed, progress)
                train.save_full(model, tokenizer, tmp)
            else:
                model, tokenizer, loss = train.train_lora(base, skill, spec, self.spec.seed, progress)
                train.save_lora(model, tokenizer, tmp, base)
            return {"final_loss": loss}

        info = {"kind": kind, "skill": skill, "base": str(base), "train": spec.model_dump(mode="json")}
        return build_artifact(self._path(kind, skill), self.expert_key(kind, skill), info, make)

    def build_experts(self, workers: int = 2) -> None:
        """Every missing expert, ``workers`` spawned single-threaded processes at a time.

        Two 1-thread processes train ~1.2x faster in total than one 2-thread process on
        2 cores (SmolLM2-135M, batch 8: 3.2 s vs 1.9 s per step), and one thread per
        expert keeps its weights independent of ``workers``.
        """
        missing = set(self.missing())
        jobs = [(k, s) for k in ("full", "lora") for s in self.spec.skills if f"{k}:{s}" in missing]
        if not jobs:
            return
        started = time.perf_counter()
        ctx = multiprocessing.get_context("spawn")
        bar = tqdm(total=len(jobs), desc="experts", unit="expert")
        with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=ctx) as pool:
            futures = {pool.submit(_expert_job, self.layout.root, self.spec, k, s): (k, s) for k, s in jobs}
            for future in as_completed(futures):
                kind, skill = futures[future]
                seconds = future.result()
                bar.update(1)
                bar.write(f"built {kind} expert {skill} ({seconds:.0f} s)")
        bar.close()
        self.timings["experts"] = time.perf_counter() - started

    def build_matrix(self) -> list[AccuracyMatrix]:
        from deltaserve_zoo.real.matrix import score_suite

        def make(tmp: Path) -> dict:
            matrix, samples = score_suite(self.layout, self.spec, self.log)
            matrix.save(tmp, f"SmolLM2-135M-Instruct real suite, test split ({self.spec.eval_examples} "
                             "prompts per skill), greedy through vLLM, normalised exact match")
            write_json_atomic(tmp / "samples.json", samples, sort_keys=False)
            return {"summary": matrix.summary(), "seconds": matrix.meta.get("seconds")}

        info = {"kind": "matrix", "skills": list(self.spec.skills)}
        self._timed("matrix", lambda: build_artifact(self.layout.matrix, self.matrix_key(), info, make))
        return [AccuracyMatrix.load(self.layout.matrix / "real.json")]

    def build(self, workers: int = 2) -> list[AccuracyMatrix]:
        """Everything, cached; returns the accuracy matrix (base, full and LoRA rows x skills)."""
        todo = self.missing()
        if todo:
            self.log(f"real suite: building {len(todo)} artifacts under {self.layout.root}, "
                     f"estimated {self.estimate_seconds(workers) / 60:.0f} min on 2 cores")
        started = time.perf_counter()
        write_json_atomic(self.layout.root / "spec.json", self.spec.model_dump(mode="json"))
        self.build_base()
        self.build_experts(workers)
        matrices = self.build_matrix()
        if todo:
            self.timings["total"] = time.perf_counter() - started
            write_json_atomic(self.layout.root / "build-times.json", {k: round(v, 1) for k, v in self.timings.items()})
            self.log("real suite build times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in self.timings.items()))
        return matrices

    def _timed(self, phase: str, run: Callable[[], bool]) -> bool:
        started = time.perf_counter()
        built = run()
        if built:
            self.timings[phase] = time.perf_counter() - started
        return built


def _expert_job(root: Path, spec: RealSuiteSpec, kind: str, skill: str) -> float:
    """One expert in a worker process, with one thread (deterministic); returns its seconds."""
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    RealSuiteBuilder(root, spec, log=lambda _msg: None).build_expert(kind, skill, progress=False)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    """``python -m zoo.real.build [--root DIR] [--workers N]``: build (cached) and print the matrix."""
    import argparse

    parser = argparse.ArgumentParser(description="Build the real suite (SmolLM2-135M-Instruct experts).")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--workers", type=int, default=2, help="experts trained in parallel (1 thread each)")
    args = parser.parse_args(argv)
    for matrix in RealSuiteBuilder(args.root).build(workers=args.workers):
        matrix.print(title="real suite: test split, greedy via vLLM, exact match")
        print(", ".join(f"{k} {v:.1%}" for k, v in matrix.summary().items()))


if __name__ == "__main__":
    main()
