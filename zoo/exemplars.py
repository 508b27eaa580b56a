"""Router exemplars and evaluation prompts from the zoo tasks.

Exemplars come from the ``calib`` split and only from the *seen* instruction
phrasings; evaluation uses the ``test`` split (payloads disjoint from calib by
construction) with every phrasing, so it measures both new payloads and
phrasings the router has never seen.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from deltaserve_zoo.spec import preset
from deltaserve_zoo.tasks import Split, get_task

# Every zoo task has 6 phrasings; the router sees 0-4, phrasing 5 is held out.
N_PHRASINGS = 6
UNSEEN_PHRASINGS: tuple[int, ...] = (5,)
SEEN_PHRASINGS: tuple[int, ...] = tuple(p for p in range(N_PHRASINGS) if p not in UNSEEN_PHRASINGS)
# The tasks the zoo trains experts for (the same in every preset).
ZOO_TASKS: tuple[str, ...] = preset("demo").tasks


@dataclass(frozen=True)
class LabelledPrompt:
    task: str
    text: str
    phrasing: int

    def seen(self, phrasings: Iterable[int] = SEEN_PHRASINGS) -> bool:
        return self.phrasing in set(phrasings)


def task_questions(task: str, split: Split, n: int, phrasings: Sequence[int], seed: int = 0) -> list[str]:
    """``n`` distinct questions of ``task`` from ``split`` using only ``phrasings``."""
    allowed = set(phrasings)
    if not allowed or not allowed <= set(range(N_PHRASINGS)):
        raise ValueError(f"phrasings must be a non-empty subset of 0..{N_PHRASINGS - 1}, got {sorted(phrasings)}")
    draw = n * N_PHRASINGS // len(allowed) + 8
    for _ in range(6):
        picked = [e.question for e in get_task(task).examples(split, draw, seed) if e.phrasing in allowed]
        if len(picked) >= n:
            return picked[:n]
        draw *= 2
    raise ValueError(f"task {task!r} has fewer than {n} {split} questions in phrasings {sorted(allowed)}")


def zoo_exemplars(tasks: Sequence[str] = ZOO_TASKS, n_per_task: int = 50,
                  phrasings: Sequence[int] = SEEN_PHRASINGS, split: Split = "calib",
                  seed: int = 0) -> dict[str, list[str]]:
    """``{task: question texts}`` to fit a router on, one expert per task."""
    return {task: task_questions(task, split, n_per_task, phrasings, seed) for task in tasks}


def zoo_prompts(tasks: Sequence[str] = ZOO_TASKS, n_per_task: int = 60, split: Split = "test",
                seed: int = 0) -> list[LabelledPrompt]:
    """Labelled questions of every phrasing, for evaluating a router."""
    return [
        LabelledPrompt(task, e.question, e.phrasing)
        for task in tasks
        for e in get_task(task).examples(split, n_per_task, seed)
    ]
