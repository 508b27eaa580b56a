"""Suites for the quality benchmarks: task vectors plus scorers, the budget, the cell cache.

``llm_suite`` wraps the zoo's LLM full fine-tunes (exact match, teacher-forced
answer loss); ``vision_suite``/``vision_suite_from`` the digits MLP bodies with
their carried task heads. ``CellCache`` is the append-only jsonl that lets
bench.quality.tables resume.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from deltaserve.experts.nps import Objective
from deltaserve.experts.taskvector import TaskVector

DENSITIES = (0.01, 0.02, 0.05, 0.1, 0.2)


@dataclass(frozen=True)
class Budget:
    """Every number that changes a result; its hash keys the cell cache."""

    calib_n: int = 64  # LLM calib examples per task (vision uses its whole calib split)
    test_n: int = 200  # LLM test examples per task (vision uses its whole test split)
    generations: int = 25
    population: int | None = None  # None: pycma's default, 4 + 3 ln(bands) = 10 for 8 bands
    bands: int = 8
    per_tensor: bool = True
    densities: tuple[float, ...] = DENSITIES
    interp_density: float = 0.05
    interp_lambdas: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
    merge_lambdas: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0, 2.5, 3.0)
    trim_densities: tuple[float, ...] = (0.1, 0.2, 0.3)
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


Scorer = Callable[[Mapping[str, Tensor], Sequence[str], str], dict[str, float]]


@dataclass
class Suite:
    """Task vectors plus ``score(deltas, tasks, split)`` and a calibration objective per task."""

    name: str
    tasks: list[str]
    tvs: dict[str, TaskVector]
    score: Scorer
    objective: Callable[[str], Objective]
    calib_sizes: dict[str, int] = field(default_factory=dict)


# ------------------------------------------------------------------ cell cache


class CellCache:
    """Append-only jsonl of finished cells; only cells made under the same budget are reused."""

    def __init__(self, path: Path, budget_key: str):
        self.path, self.budget_key = Path(path), budget_key
        self.cells: dict[str, dict] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                row = json.loads(line)
                if row.get("budget") == budget_key:
                    self.cells[row["key"]] = row["value"]

    def get(self, key: str, make: Callable[[], dict]) -> dict:
        if key not in self.cells:
            started = time.perf_counter()
            value = {**make(), "seconds": round(time.perf_counter() - started, 3)}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"budget": self.budget_key, "key": key, "value": value}) + "\n")
            self.cells[key] = value
        return self.cells[key]


# ------------------------------------------------------------------ suites


def _tie_break(accuracy: float, loss: float, n: int) -> float:
    """Accuracy plus a term in (0, 0.5/n]: never outweighs one more correct example,
    but orders candidates where accuracy is flat (e.g. 0 for every heavily pruned LLM)."""
    return accuracy + 0.5 / n * math.exp(-loss)


def llm_suite(zoo: Path, tasks: Sequence[str], budget: Budget, tvs: Mapping[str, TaskVector] | None = None) -> Suite:
    """The zoo's full fine-tunes as task vectors (or ``tvs``, e.g. re-trained ones, over the same base)."""
    from deltaserve.experts.taskvector import extract_full
    from deltaserve_zoo.build import ZooLayout, load_llama, load_tokenizer
    from deltaserve_zoo.evaluate import TaskEvaluator, swapped_weights
    from deltaserve_zoo.lm import collate_supervised, encode_supervised

    layout = ZooLayout(Path(zoo))
    tokenizer, model = load_tokenizer(layout.base), load_llama(layout.base)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tvs = dict(tvs) if tvs is not None else {t: extract_full(layout.base, layout.full(t)) for t in tasks}
    evaluators = {"calib": TaskEvaluator(tokenizer, tasks, "calib", budget.calib_n, budget.seed),
                  "test": TaskEvaluator(tokenizer, tasks, "test", budget.test_n, budget.seed)}
    answers = {t: collate_supervised(encode_supervised(tokenizer, evaluators["calib"].examples(t)),
                                     tokenizer.pad_token_id) for t in tasks}

    def weights(deltas: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: base[k] + d.to(base[k].dtype) for k, d in deltas.items()}

    def score(deltas, names, split):
        with swapped_weights(model, weights(deltas)):
            return evaluators[split].score(model, names)

    def objective(task: str) -> Objective:
        @torch.inference_mode()
        def calib(deltas: Mapping[str, Tensor]) -> float:
            with swapped_weights(model, weights(deltas)):
                accuracy = evaluators["calib"].score(model, [task])[task]
                ids, labels, mask = answers[task]
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
            return _tie_break(accuracy, loss, budget.calib_n)

        return calib

    return Suite("llm", list(tasks), tvs, score, objective, {t: budget.calib_n for t in tasks})


def vision_suite(zoo: Path, tasks: Sequence[str] | None = None) -> Suite:
    from safetensors.torch import load_file

    from deltaserve_zoo.build import ZooLayout
    from deltaserve_zoo.spec import ZooSpec

    layout = ZooLayout(Path(zoo))
    spec = ZooSpec.model_validate(json.loads((layout.root / "spec.json").read_text())).vision
    tasks = list(tasks or spec.tasks)
    tuned = {t: load_file(layout.vision(t) / "model.safetensors") for t in tasks}
    sources = {t: str(layout.vision(t)) for t in tasks}
    return vision_suite_from(load_file(layout.vision("base") / "model.safetensors"), tuned, spec.hidden_size, sources)


def vision_suite_from(base: Mapping[str, Tensor], tuned: Mapping[str, Mapping[str, Tensor]], hidden_size: int,
                      sources: Mapping[str, str] | None = None, name: str = "vision") -> Suite:
    """The vision suite over in-memory digits-MLP state dicts: tau lives in the body; each task's
    head is carried alongside (never merged or compressed) and scores that task."""
    from deltaserve_zoo import vision
    from deltaserve_zoo.evaluate import swapped_weights

    tasks = list(tuned)
    base = dict(base)
    fingerprint = hashlib.sha256(b"".join(base[k].numpy().tobytes() for k in sorted(base))).hexdigest()[:32]
    model = vision.DigitsMLP(hidden_size)
    model.load_state_dict(base)
    model.eval()
    tvs, heads = {}, {}
    for task, state in tuned.items():
        deltas = {k: state[k].float() - base[k].float() for k in base if k.startswith("body.")}
        carried = {k: v for k, v in state.items() if k.startswith("head.")}
        tvs[task] = TaskVector(deltas, fingerprint, "full", (sources or {}).get(task, f"{name}/{task}"), carried)
        heads[task] = torch.nn.Linear(hidden_size, vision.N_CLASSES)
        heads[task].load_state_dict({k.removeprefix("head."): v for k, v in carried.items()})
    calib = {t: vision.digits(t, "calib") for t in tasks}

    def weights(deltas: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: base[k] + d.to(base[k].dtype) for k, d in deltas.items()}

    def score(deltas, names, split):
        with swapped_weights(model, weights(deltas)):
            return {t: vision.accuracy(model.body, heads[t], t, split) for t in names}

    def objective(task: str) -> Objective:
        @torch.inference_mode()
        def calib_score(deltas: Mapping[str, Tensor]) -> float:
            x, y = calib[task]
            with swapped_weights(model, weights(deltas)):
                logits = heads[task](model.body(x))
            accuracy = (logits.argmax(-1) == y).float().mean().item()
            loss = torch.nn.functional.cross_entropy(logits, y).item()
            return _tie_break(accuracy, loss, len(y))

        return calib_score

    return Suite(name, tasks, tvs, score, objective, {t: len(calib[t][1]) for t in tasks})
