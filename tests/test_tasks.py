import re

import pytest

from deltaserve_zoo.tasks import SPLITS, TASKS, exact_match, get_task


def _payload(task, question):
    """Recover the payload from a question using the phrasing template."""
    for template in task.phrasings:
        pattern = re.escape(template)
        for field in ("x", "c", "n"):
            pattern = pattern.replace(re.escape("{" + field + "}"), f"(?P<{field}>[a-z0-9]+)")
        m = re.fullmatch(pattern, question)
        if m:
            return m.groupdict()
    raise AssertionError(f"{question!r} matches no phrasing of {task.name}")


REFERENCE = {
    "reverse": lambda p: p["x"][::-1],
    "sort": lambda p: "".join(sorted(p["x"])),
    "upper": lambda p: p["x"].upper(),
    "double": lambda p: "".join(c * 2 for c in p["x"]),
    "length": lambda p: str(len(p["x"])),
    "vowels": lambda p: re.sub("[aeiou]", "", p["x"]),
    "shift": lambda p: "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in p["x"]),
    "alternate": lambda p: p["x"][::2],
    "count_vowels": lambda p: str(sum(c in "aeiou" for c in p["x"])),
    "count_letter": lambda p: str(p["x"].count(p["c"])),
    "max_digit": lambda p: max(p["n"]),
    "distinct": lambda p: str(len(set(p["x"]))),
    "min_digit": lambda p: min(p["n"]),
    "count_consonants": lambda p: str(sum(c not in "aeiou" for c in p["x"])),
}


def test_at_least_six_tasks_each_with_several_phrasings():
    assert len(TASKS) >= 6
    assert set(REFERENCE) == set(TASKS)
    for task in TASKS.values():
        assert len(task.phrasings) >= 4
        assert len(set(task.phrasings)) == len(task.phrasings)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_answers_match_an_independent_reference(name):
    task = get_task(name)
    for ex in task.examples("train", 200):
        assert ex.answer == REFERENCE[name](_payload(task, ex.question)), ex
        assert ex.answer != ""


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_are_disjoint_by_payload(name):
    task = get_task(name)
    payloads = {
        split: {tuple(sorted(_payload(task, e.question).items())) for e in task.examples(split, 300)}
        for split in SPLITS
    }
    assert not payloads["train"] & payloads["test"]
    assert not payloads["train"] & payloads["calib"]
    assert not payloads["calib"] & payloads["test"]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_examples_deterministic_in_seed_and_use_every_phrasing(name):
    task = get_task(name)
    a, b = task.examples("test", 120, seed=3), task.examples("test", 120, seed=3)
    assert a == b
    assert task.examples("test", 120, seed=4) != a
    assert {e.phrasing for e in a} == set(range(len(task.phrasings)))
    assert len({(e.question) for e in a}) == len(a)


def test_exact_match_strips_whitespace_only():
    assert exact_match(" abc\n", "abc")
    assert not exact_match("ABC", "abc")
    assert not exact_match("ab c", "abc")


def test_unknown_task_and_split_errors_name_the_options():
    with pytest.raises(KeyError, match="known tasks"):
        get_task("nope")
    with pytest.raises(ValueError, match="expected one of"):
        get_task("reverse").examples("dev", 3)
