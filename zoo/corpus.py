"""Offline pretraining stream: Python standard-library source plus skill documents.

Every machine with CPython has the stdlib, so the base model can be
"pretrained" on real text without any download. Real pretrained LLMs arrive
knowing string operations from code they have read, and instruction tuning
only teaches them which operation a phrasing asks for. A tiny model trained
for minutes on raw source never gets there, so two kinds of short documents
are interleaved with the text:

- *doctest snippets* (``>>> sorted('cab')``) — the operations the zoo tasks
  use, in Python notation only, never in the ``Q:/A:`` task format;
- *generic Q/A skills* (copy, first/last letter, successor, ...) — the
  question format itself, on questions that are not zoo tasks.

The base must still fail the zoo tasks (checked by the build's accuracy
matrix). Everything is deterministic in the seed and fingerprinted.
"""

from __future__ import annotations

import hashlib
import random
import string
import sysconfig
from collections.abc import Callable
from pathlib import Path

from deltaserve.experts.registry import Registry
from deltaserve_zoo.tokenizer import BOS, EOS, format_prompt

Draw = Callable[[random.Random], tuple[str, str]]
SKILLS: Registry[Draw] = Registry("skill")
DOCTESTS: Registry[Draw] = Registry("doctest")


def doctest(name: str):
    """Register a doctest snippet ``rng -> (python expression, repr of its value)``."""

    def register(fn: Draw):
        return DOCTESTS.add(name, fn)

    return register


def skill(name: str):
    """Register a generic Q/A pretraining skill ``rng -> (question, answer)``."""

    def register(fn: Draw):
        return SKILLS.add(name, fn)

    return register


def _letters(rng: random.Random, lo: int = 1, hi: int = 10) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


@skill("copy")
def _copy(rng: random.Random) -> tuple[str, str]:
    x = _letters(rng)
    return f"Repeat {x}", x


@skill("first")
def _first(rng: random.Random) -> tuple[str, str]:
    x = _letters(rng)
    return f"First letter of {x}?", x[0]


@skill("last")
def _last(rng: random.Random) -> tuple[str, str]:
    x = _letters(rng)
    return f"Last letter of {x}?", x[-1]


@skill("successor")
def _successor(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 198)
    return f"What comes after {n}?", str(n + 1)


@skill("join")
def _join(rng: random.Random) -> tuple[str, str]:
    x, y = _letters(rng, 1, 6), _letters(rng, 1, 6)
    return f"Join {x} and {y}", x + y


@skill("smallest")
def _smallest(rng: random.Random) -> tuple[str, str]:
    x = _letters(rng, 2, 10)
    return f"Smallest letter in {x}?", min(x)


@skill("next_letter")
def _next_letter(rng: random.Random) -> tuple[str, str]:
    c = rng.choice(string.ascii_lowercase[:-1])
    return f"Letter after {c}?", chr(ord(c) + 1)


@doctest("slice_reverse")
def _dt_reverse(rng: random.Random) -> tuple[str, str]:
    x = _letters(rng, 2, 9)
    return f"{x!r}[::-1]", repr(x[::-1])


@doctest("sorted_join")
def _dt_sorted(rng: random.Random) -> tuple[str, str]:
    x = _letters(rng, 2, 9)
    return f"''.join(sorted({x!r}))", repr("".join(sorted(x)))


@doctest("upper")
def _dt_upper(rng: random.Random) -> tuple[str, str]:
    x = _letters(rng, 2, 9)
    return f"{x!r}.upper()", repr(x.upper())


@doctest("len")
def _dt_len(rng: random.Random) -> tuple[str, str]:
    x = _letters(rng, 1, 12)
    return f"len({x!r})", str(len(x))


@doctest("strip_vowels")
def _dt_vowels(rng: random.Random) -> tuple[str, str]:
    x = _letters(rng, 3, 9)
    return f"re.sub('[aeiou]', '', {x!r})", repr("".join(c for c in x if c not in "aeiou"))


@doctest("shift_letters")
def _dt_shift(rng: random.Random) -> tuple[str, str]:
    x = _letters(rng, 2, 8)
    shifted = "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in x)
    return f"{x!r}.translate(ROT1)", repr(shifted)


@doctest("every_other")
def _dt_every_other(rng: random.Random) -> tuple[str, str]:
    x = _letters(rng, 3, 10)
    return f"{x!r}[::2]", repr(x[::2])


@doctest("count_vowels")
def _dt_count_vowels(rng: random.Random) -> tuple[str, str]:
    x = _letters(rng, 3, 10)
    return f"sum(c in 'aeiou' for c in {x!r})", str(sum(c in "aeiou" for c in x))


@doctest("count_letter")
def _dt_count_letter(rng: random.Random) -> tuple[str, str]:
    c = rng.choice("abcdefgh")
    x = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(4, 10)))
    return f"{x!r}.count({c!r})", str(x.count(c))


@doctest("max_digit")
def _dt_max_digit(rng: random.Random) -> tuple[str, str]:
    n = "".join(rng.choice(string.digits) for _ in range(rng.randint(4, 8)))
    return f"max({n!r})", repr(max(n))


@doctest("distinct")
def _dt_distinct(rng: random.Random) -> tuple[str, str]:
    x = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 10)))
    return f"len(set({x!r}))", str(len(set(x)))


@doctest("double_letters")
def _dt_double(rng: random.Random) -> tuple[str, str]:
    x = _letters(rng, 2, 6)
    return f"''.join(c * 2 for c in {x!r})", repr("".join(c + c for c in x))


def _skill_document(
    rng: random.Random, skill_names: list[str], doctest_names: list[str], doctest_share: float
) -> str:
    if rng.random() < doctest_share:
        expr, value = DOCTESTS[rng.choice(doctest_names)](rng)
        return f"\n>>> {expr}\n{value}\n"
    question, answer = SKILLS[rng.choice(skill_names)](rng)
    return f"{BOS}{format_prompt(question)}{answer}{EOS}"


def stdlib_text(max_bytes: int) -> str:
    """Concatenate stdlib ``.py`` files (sorted by path, ASCII only) up to ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        text = text.encode("ascii", errors="ignore").decode("ascii")
        parts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return "".join(parts)[:max_bytes]


def pretraining_documents(
    text_bytes: int, skills_per_chunk: tuple[int, int], seed: int, doctest_share: float = 0.5
) -> list[str]:
    """Stdlib text in 200-800 character chunks, each followed by skill documents.

    A ``doctest_share`` of the skill documents are doctest snippets (``>>> expr\\nvalue\\n``), the rest
    generic Q/A skills (``<s>Q: …\\nA: …</s>``). Concatenated in order, the
    documents form the pretraining stream.
    """
    rng = random.Random(f"pretrain/{seed}")
    text = stdlib_text(text_bytes)
    skill_names, doctest_names = sorted(SKILLS), sorted(DOCTESTS)
    docs: list[str] = []
    pos = 0
    while pos < len(text):
        n = rng.randint(200, 800)
        docs.append(text[pos : pos + n])
        pos += n
        for _ in range(rng.randint(*skills_per_chunk)):
            docs.append(_skill_document(rng, skill_names, doctest_names, doctest_share))
    return docs


def text_fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
