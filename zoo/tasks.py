"""Synthetic LLM tasks of the zoo: generators, phrasings, splits, scoring.

Each task is one decorated generator function, registered once. A generator
draws one ``(payload, answer)`` pair from a seeded ``random.Random``; the
payload is filled into one of the task's instruction phrasings to make the
question. Splits are decided by a hash of the payload, so a payload seen in
``train`` never appears in ``calib`` or ``test`` — whatever the seed.
Scoring is exact match after stripping surrounding whitespace.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from deltaserve.experts.registry import Registry

Split = Literal["train", "calib", "test"]
SPLITS: tuple[Split, ...] = ("train", "calib", "test")
# Share of the payload-hash space owned by each split (train, calib, test).
_SPLIT_BOUNDS = {"train": (0, 80), "calib": (80, 90), "test": (90, 100)}


@dataclass(frozen=True)
class Example:
    task: str
    question: str
    answer: str
    phrasing: int


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    phrasings: tuple[str, ...]
    draw: Callable[[random.Random], tuple[dict[str, str], str]]

    def examples(self, split: Split, n: int, seed: int = 0) -> list[Example]:
        """``n`` distinct examples of one split, deterministic in ``seed``."""
        if split not in _SPLIT_BOUNDS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        lo, hi = _SPLIT_BOUNDS[split]
        out: list[Example] = []
        seen: set[tuple[str, int]] = set()
        for _ in range(n * 200):
            if len(out) == n:
                return out
            fields, answer = self.draw(rng)
            key = "|".join(f"{k}={fields[k]}" for k in sorted(fields))
            if not lo <= _bucket(self.name, key) < hi:
                continue
            phrasing = rng.randrange(len(self.phrasings))
            if (key, phrasing) in seen:
                continue
            seen.add((key, phrasing))
            question = self.phrasings[phrasing].format(**fields)
            out.append(Example(self.name, question, answer, phrasing))
        raise ValueError(f"task {self.name!r} cannot supply {n} distinct {split} examples")


TASKS: Registry[Task] = Registry("task")


def task(name: str, description: str, phrasings: list[str]):
    """Register a generator ``rng -> (fields, answer)`` as a zoo task."""

    def register(draw: Callable[[random.Random], tuple[dict[str, str], str]]):
        TASKS.add(name, Task(name, description, tuple(phrasings), draw))
        return draw

    return register


def get_task(name: str) -> Task:
    return TASKS[name]


def exact_match(prediction: str, answer: str) -> bool:
    return prediction.strip() == answer.strip()


def _bucket(task_name: str, key: str) -> int:
    digest = hashlib.sha256(f"{task_name}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100


def _word(rng: random.Random, lo: int = 3, hi: int = 7) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


@task(
    "reverse",
    "write the letters in reverse order",
    [
        "Reverse the letters: {x}",
        "Write {x} backwards.",
        "Spell {x} in reverse order.",
        "What is {x} read from right to left?",
        "Mirror the string {x}",
        "Flip the order of the characters in {x}",
    ],
)
def _reverse(rng: random.Random) -> tuple[dict[str, str], str]:
    x = _word(rng)
    return {"x": x}, x[::-1]


@task(
    "sort",
    "sort the letters alphabetically",
    [
        "Sort the letters of {x} alphabetically.",
        "Put the characters {x} in alphabetical order.",
        "Arrange {x} from a to z.",
        "Order these letters: {x}",
        "Alphabetize {x}",
        "Rearrange {x} so its letters are sorted.",
    ],
)
def _sort(rng: random.Random) -> tuple[dict[str, str], str]:
    x = _word(rng)
    return {"x": x}, "".join(sorted(x))


@task(
    "upper",
    "convert the letters to upper case",
    [
        "Convert {x} to uppercase.",
        "Capitalize every letter: {x}",
        "Write {x} in capital letters.",
        "Shout this word: {x}",
        "Make {x} all caps.",
        "Upper-case the text {x}",
    ],
)
def _upper(rng: random.Random) -> tuple[dict[str, str], str]:
    x = _word(rng)
    return {"x": x}, x.upper()


@task(
    "double",
    "write every letter twice",
    [
        "Double each letter of {x}",
        "Write every character of {x} twice.",
        "Repeat each letter in {x} two times.",
        "Stutter the word {x}",
        "Echo every letter: {x}",
        "Say each character of {x} twice in a row.",
    ],
)
def _double(rng: random.Random) -> tuple[dict[str, str], str]:
    x = _word(rng, 3, 6)
    return {"x": x}, "".join(c + c for c in x)


@task(
    "length",
    "count the characters of a word",
    [
        "How many letters are in {x}?",
        "Count the characters of {x}.",
        "What is the length of {x}?",
        "Number of letters in the word {x}?",
        "Tell me how long {x} is.",
        "len({x}) = ?",
    ],
)
def _length(rng: random.Random) -> tuple[dict[str, str], str]:
    x = _word(rng, 1, 12)
    return {"x": x}, str(len(x))


@task(
    "vowels",
    "delete every vowel",
    [
        "Remove the vowels from {x}",
        "Delete every vowel in {x}.",
        "Strip a, e, i, o and u out of {x}",
        "Write {x} without its vowels.",
        "Drop the vowels: {x}",
        "Keep only the consonants of {x}",
    ],
)
def _vowels(rng: random.Random) -> tuple[dict[str, str], str]:
    x = _word(rng, 4, 9)
    while not set(x) - set("aeiou"):  # at least one consonant: never an empty answer
        x = _word(rng, 4, 9)
    return {"x": x}, "".join(c for c in x if c not in "aeiou")


@task(
    "shift",
    "replace every letter by the next one in the alphabet",
    [
        "Shift each letter of {x} forward by one.",
        "Apply a Caesar shift of 1 to {x}",
        "Move every letter in {x} one step up the alphabet.",
        "Encode {x} with ROT1.",
        "Replace each letter of {x} by its successor.",
        "Advance the letters {x} by one place.",
    ],
)
def _shift(rng: random.Random) -> tuple[dict[str, str], str]:
    x = _word(rng)
    return {"x": x}, "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in x)


@task(
    "alternate",
    "keep every other letter, starting with the first",
    [
        "Take every other letter of {x}",
        "Keep the 1st, 3rd, 5th... characters of {x}",
        "Skip every second letter in {x}.",
        "Write the odd-position letters of {x}",
        "Drop every second character: {x}",
        "Keep the first letter of each pair in {x}",
    ],
)
def _alternate(rng: random.Random) -> tuple[dict[str, str], str]:
    x = _word(rng, 4, 10)
    return {"x": x}, x[::2]


@task(
    "count_vowels",
    "count the vowels of a word",
    [
        "How many vowels are in {x}?",
        "Count the vowels of {x}.",
        "Number of vowels in the word {x}?",
        "How many of a, e, i, o, u appear in {x}?",
        "Tell me the vowel count of {x}.",
        "Vowels in {x}: how many?",
    ],
)
def _count_vowels(rng: random.Random) -> tuple[dict[str, str], str]:
    x = _word(rng, 3, 10)
    return {"x": x}, str(sum(c in "aeiou" for c in x))


@task(
    "count_letter",
    "count how often one letter occurs in a word",
    [
        "How many times does {c} appear in {x}?",
        "Count the letter {c} in {x}.",
        "Number of {c}'s in {x}?",
        "How often is {c} found in {x}?",
        "In {x}, count occurrences of {c}.",
        "Tally the {c} characters of {x}",
    ],
)
def _count_letter(rng: random.Random) -> tuple[dict[str, str], str]:
    c = rng.choice("abcdefgh")
    x = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(4, 10)))
    return {"c": c, "x": x}, str(x.count(c))


@task(
    "max_digit",
    "name the largest digit of a number",
    [
        "What is the largest digit in {n}?",
        "Find the biggest digit of {n}.",
        "Which digit of {n} is the highest?",
        "Max digit of {n}?",
        "Tell me the greatest digit appearing in {n}.",
        "Largest single digit inside {n}:",
    ],
)
def _max_digit(rng: random.Random) -> tuple[dict[str, str], str]:
    n = "".join(rng.choice(string.digits) for _ in range(rng.randint(4, 8)))
    return {"n": n}, max(n)


@task(
    "distinct",
    "count the different letters of a word",
    [
        "How many different letters are in {x}?",
        "Count the distinct characters of {x}.",
        "Number of unique letters in {x}?",
        "How many letters of {x} are different from each other?",
        "Distinct letter count of {x}:",
        "Ignoring repeats, how many letters does {x} use?",
    ],
)
def _distinct(rng: random.Random) -> tuple[dict[str, str], str]:
    x = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 10)))
    return {"x": x}, str(len(set(x)))


@task(
    "min_digit",
    "name the smallest digit of a number",
    [
        "What is the smallest digit in {n}?",
        "Find the lowest digit of {n}.",
        "Which digit of {n} is the least?",
        "Min digit of {n}?",
        "Tell me the tiniest digit appearing in {n}.",
        "Smallest single digit inside {n}:",
    ],
)
def _min_digit(rng: random.Random) -> tuple[dict[str, str], str]:
    n = "".join(rng.choice(string.digits) for _ in range(rng.randint(4, 8)))
    return {"n": n}, min(n)


@task(
    "count_consonants",
    "count the consonants of a word",
    [
        "How many consonants are in {x}?",
        "Count the consonants of {x}.",
        "Number of non-vowel letters in {x}?",
        "How many letters of {x} are not vowels?",
        "Tell me the consonant count of {x}.",
        "Consonants in {x}: how many?",
    ],
)
def _count_consonants(rng: random.Random) -> tuple[dict[str, str], str]:
    x = _word(rng, 3, 10)
    return {"x": x}, str(sum(c not in "aeiou" for c in x))
