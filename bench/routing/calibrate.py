"""Calibrate the policy's fallback thresholds on the zoo (no test-split data).

``max_distance``: leave one phrasing out — fit the router on the seen phrasings
but one, and measure the nearest-exemplar distance of held-out calib prompts
in the left-out phrasing (a new payload *and* a new wording: what an unseen
in-distribution prompt looks like). The threshold is their ``quantile``
(0.99) plus a margin. ``min_confidence``: the 1st percentile of the routers'
confidence on the same held-out prompts where they route correctly.
Then check that plain prose / code / chat (``OOD_TEXTS``) falls back.

    .venv/bin/python -m bench.routing.calibrate --out results/routing/calibration.json
    .venv/bin/python -m bench.routing.calibrate --encoder static --out results/routing/calibration_static.json

prints the numbers stored in router/base.py (DEFAULT_MAX_DISTANCE, DEFAULT_MIN_CONFIDENCE)
and, for ``--encoder static``, router/static.py's STATIC_MAX_DISTANCE (distances are the encoder's own).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.common import provenance
from deltaserve.router.base import Policy, Router, make_router
from deltaserve.router.features import Encoder
from deltaserve.router.service import RoutingService
from deltaserve_zoo.exemplars import SEEN_PHRASINGS, ZOO_TASKS, task_questions, zoo_exemplars

# Not zoo tasks: prose, questions, code, chat. Tests use a different list.
OOD_TEXTS: tuple[str, ...] = (
    "The committee will meet again next Thursday to review the budget.",
    "What is the capital of Australia?",
    "Write a short poem about autumn leaves.",
    "Explain how a refrigerator keeps food cold.",
    "for i in range(10): print(i * i)",
    "Can you recommend a good book about the history of Rome?",
    "I think the weather is going to be lovely this weekend.",
    "Translate 'good morning' into Spanish.",
    "SELECT name, email FROM users WHERE active = 1;",
    "Summarise the plot of Hamlet in two sentences.",
    "My laptop battery drains too quickly, what should I do?",
    "The mitochondria is the powerhouse of the cell.",
    "Please draft an email declining the meeting invitation.",
    "Who won the football world cup in 2010?",
    "Describe the smell of fresh bread.",
    "import numpy as np\nx = np.zeros(3)",
    "How do I reset my password?",
    "Tell me a joke about penguins.",
    "Quarterly revenue grew by eight percent year over year.",
    "What are the health benefits of green tea?",
)


@dataclass(frozen=True)
class Calibration:
    max_distance: float
    min_confidence: float
    quantile: float
    margin: float
    held_out_distance_quantile: float
    held_out_fallback_rate: float
    ood_min_distance: float
    ood_fallback_rate: float
    n_held_out: int
    n_ood: int


def leave_one_phrasing_out(encoder: Encoder, router_name: str, tasks: Sequence[str], n_per_task: int,
                           phrasings: Sequence[int] = SEEN_PHRASINGS) -> tuple[np.ndarray, np.ndarray]:
    """(nearest distances, confidence where correct else nan) of held-out calib prompts,
    each scored by a router that never saw its phrasing."""
    distances, confidences = [], []
    for left_out in phrasings:
        router: Router = make_router(router_name, encoder=encoder)
        router.fit(zoo_exemplars(tasks, n_per_task, [p for p in phrasings if p != left_out]))
        for task in tasks:
            held_out = task_questions(task, "calib", n_per_task // 2, [left_out], seed=1)
            for scores, distance in router.score(held_out):
                top = max(scores, key=scores.get)
                distances.append(distance)
                confidences.append(scores[top] if top == task else math.nan)
    return np.asarray(distances), np.asarray(confidences)


def calibrate(encoder: Encoder, tasks: Sequence[str] = ZOO_TASKS, n_per_task: int = 50, quantile: float = 0.99,
              margin: float = 0.05, ood_texts: Sequence[str] = OOD_TEXTS) -> Calibration:
    distances, knn_conf = leave_one_phrasing_out(encoder, "knn", tasks, n_per_task)
    _, gate_conf = leave_one_phrasing_out(encoder, "gate", tasks, n_per_task)
    max_distance = _ceil_to(float(np.quantile(distances, quantile)) + margin, 0.01)
    lowest = min(np.nanquantile(knn_conf, 0.01), np.nanquantile(gate_conf, 0.01))
    min_confidence = math.floor(lowest / 0.05) * 0.05
    router = make_router("knn", encoder=encoder)
    router.fit(zoo_exemplars(tasks, n_per_task))
    service = RoutingService(router, Policy(min_confidence=min_confidence, max_distance=max_distance))
    ood = service.route(list(ood_texts))
    return Calibration(
        max_distance=max_distance, min_confidence=round(min_confidence, 2), quantile=quantile, margin=margin,
        held_out_distance_quantile=round(float(np.quantile(distances, quantile)), 4),
        held_out_fallback_rate=round(float(np.mean(distances > max_distance)), 4),
        ood_min_distance=round(min(d.distance for d in ood), 4),
        ood_fallback_rate=round(sum(d.fallback is not None for d in ood) / len(ood), 4),
        n_held_out=len(distances), n_ood=len(ood),
    )


def _ceil_to(value: float, step: float) -> float:
    return round(math.ceil(value / step - 1e-9) * step, 6)


def main(argv: Sequence[str] | None = None) -> Calibration:
    import torch

    from deltaserve.router.features import SentenceEncoder
    from deltaserve.router.static import StaticEncoder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantile", type=float, default=0.99)
    parser.add_argument("--margin", type=float, default=0.05)
    parser.add_argument("--n-per-task", type=int, default=50)
    parser.add_argument("--encoder", choices=["minilm", "static"], default="minilm", help="prompt features")
    parser.add_argument("--out", type=Path, help="write the calibration as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    record = provenance(argv=argv)
    encoder = StaticEncoder() if args.encoder == "static" else SentenceEncoder()
    result = calibrate(encoder, n_per_task=args.n_per_task, quantile=args.quantile, margin=args.margin)
    text = json.dumps({**record, **asdict(result)}, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
