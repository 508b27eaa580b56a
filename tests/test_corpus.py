import ast
import re

from deltaserve_zoo.corpus import DOCTESTS, SKILLS, pretraining_documents, stdlib_text
from deltaserve_zoo.tasks import TASKS
from deltaserve_zoo.tokenizer import BOS, EOS


def test_stdlib_text_is_ascii_and_sized():
    text = stdlib_text(50_000)
    assert len(text) == 50_000
    assert text.isascii()
    assert "def " in text


def test_pretraining_documents_deterministic_and_mixed():
    a = pretraining_documents(30_000, (2, 4), seed=0)
    assert a == pretraining_documents(30_000, (2, 4), seed=0)
    assert a != pretraining_documents(30_000, (2, 4), seed=1)
    skill_docs = [d for d in a if d.startswith(BOS)]
    assert skill_docs and all(d.endswith(EOS) and "\nA: " in d for d in skill_docs)
    doctest_docs = [d for d in a if d.startswith("\n>>> ")]
    assert doctest_docs
    text = [d for d in a if not d.startswith(BOS) and not d.startswith("\n>>> ")]
    assert sum(map(len, text)) == 30_000


def test_skills_are_not_zoo_tasks():
    assert not set(SKILLS) & set(TASKS)


def test_doctest_snippets_are_true_python_and_never_in_task_format():
    import random

    rng = random.Random(0)
    for name, make in DOCTESTS.items():
        for _ in range(20):
            expr, value = make(rng)
            assert "Q:" not in expr and "A:" not in value
            rot1 = str.maketrans("abcdefghijklmnopqrstuvwxyz", "bcdefghijklmnopqrstuvwxyza")
            result = eval(expr, {"re": re, "ROT1": rot1})  # our own generated expressions, not user input
            assert repr(result) == value or str(result) == value, (name, expr, value)
            assert ast.literal_eval(value) == result
