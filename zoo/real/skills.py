"""Skills of the real suite: deterministic generators of chat examples, splits, phrasings, scoring.

A skill is one decorated generator ``rng -> Payload`` registered once (see
``zoo/real/catalog.py``). A payload is the content of one question (a date, a
review, a query to write) plus the expected answer; it is put into words by one
of the skill's instruction **phrasings**. Phrasings come in two disjoint sets:

- ``exemplar`` phrasings: used for training and for the router's exemplars;
- ``heldout`` phrasings: written separately, never trained on and never
  exemplars; they measure whether routing (and the experts) generalise to
  wording nobody showed them.

Splits are decided by a hash of the payload's canonical ``key`` (80 % train,
10 % calib, 10 % test), so a payload seen in training never appears in calib
or test, whatever the seed or the phrasing set. Scoring is exact match after
the skill's normaliser (whitespace, case of labels, JSON key order, ...).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from deltaserve.experts.examples import ChatExample
from deltaserve.experts.registry import Registry

Split = Literal["train", "calib", "test"]
PhrasingSet = Literal["exemplar", "heldout"]
SPLITS: tuple[Split, ...] = ("train", "calib", "test")
PHRASING_SETS: tuple[PhrasingSet, ...] = ("exemplar", "heldout")
# Share of the payload-hash space owned by each split, in percent: [lo, hi).
SPLIT_BOUNDS: dict[str, tuple[int, int]] = {"train": (0, 80), "calib": (80, 90), "test": (90, 100)}
_DRAWS_PER_EXAMPLE = 200


@dataclass(frozen=True)
class Payload:
    """One question's content: ``fields`` fill a phrasing, ``answer`` is the reply, ``key``
    identifies the content (two payloads with one key are the same question)."""

    fields: dict[str, str]
    answer: str
    key: str


def normalise_text(text: str) -> str:
    """Strip, collapse runs of whitespace, drop one trailing full stop."""
    text = re.sub(r"\s+", " ", text.strip())
    return text[:-1].rstrip() if text.endswith(".") else text


@dataclass(frozen=True)
class Skill:
    name: str
    description: str
    phrasings: tuple[str, ...]
    heldout_phrasings: tuple[str, ...]
    draw: Callable[[random.Random], Payload]
    normalise: Callable[[str], str] = normalise_text

    def __post_init__(self) -> None:
        shared = set(self.phrasings) & set(self.heldout_phrasings)
        if not self.phrasings or not self.heldout_phrasings or shared:
            raise ValueError(f"skill {self.name!r} needs disjoint, non-empty exemplar and held-out "
                             f"phrasings (shared: {sorted(shared)})")

    def phrasing_set(self, which: PhrasingSet) -> tuple[str, ...]:
        if which not in PHRASING_SETS:
            raise ValueError(f"unknown phrasing set {which!r}; expected one of {PHRASING_SETS}")
        return self.phrasings if which == "exemplar" else self.heldout_phrasings

    def payloads(self, split: Split, n: int, seed: int = 0, phrasings: PhrasingSet = "exemplar"
                 ) -> list[tuple[Payload, str]]:
        """``n`` distinct payloads of one split, each with the phrasing that words it."""
        if split not in SPLIT_BOUNDS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        templates = self.phrasing_set(phrasings)
        rng = random.Random(f"{self.name}/{split}/{phrasings}/{seed}")
        lo, hi = SPLIT_BOUNDS[split]
        out: list[tuple[Payload, str]] = []
        seen: set[str] = set()
        for _ in range(max(n, 1) * _DRAWS_PER_EXAMPLE):
            if len(out) == n:
                return out
            payload = self.draw(rng)
            if payload.key in seen or not lo <= payload_bucket(self.name, payload.key) < hi:
                continue
            seen.add(payload.key)
            out.append((payload, rng.choice(templates)))
        raise ValueError(f"skill {self.name!r} cannot supply {n} distinct {split} examples")

    def examples(self, split: Split, n: int, seed: int = 0, phrasings: PhrasingSet = "exemplar") -> list[ChatExample]:
        """``n`` distinct examples of one split worded with one phrasing set, deterministic in ``seed``."""
        return [ChatExample.of(template.format(**payload.fields), payload.answer)
                for payload, template in self.payloads(split, n, seed, phrasings)]

    def correct(self, prediction: str, answer: str) -> bool:
        return self.normalise(prediction) == self.normalise(answer)

    def accuracy(self, predictions: Sequence[str], examples: Sequence[ChatExample]) -> float:
        """Share of ``predictions`` that match their example's answer after normalising."""
        if len(predictions) != len(examples) or not examples:
            raise ValueError(f"need one prediction per example; got {len(predictions)} for {len(examples)}")
        return sum(self.correct(p, e.answer) for p, e in zip(predictions, examples)) / len(examples)


SKILLS: Registry[Skill] = Registry("skill")


def skill(name: str, description: str, phrasings: Sequence[str], heldout: Sequence[str],
          normalise: Callable[[str], str] = normalise_text):
    """Register a generator ``rng -> Payload`` as a skill of the real suite."""

    def register(draw: Callable[[random.Random], Payload]):
        SKILLS.add(name, Skill(name, description, tuple(phrasings), tuple(heldout), draw, normalise))
        return draw

    return register


def get_skill(name: str) -> Skill:
    from deltaserve_zoo.real import catalog  # noqa: F401  (registers the skills)

    return SKILLS[name]


def all_skills() -> list[str]:
    from deltaserve_zoo.real import catalog  # noqa: F401

    return sorted(SKILLS)


def payload_bucket(skill_name: str, key: str) -> int:
    """The payload's place in [0, 100): which split owns it."""
    digest = hashlib.sha256(f"{skill_name}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100
