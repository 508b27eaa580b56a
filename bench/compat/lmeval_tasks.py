"""Write lm-eval task configs for the zoo's tasks: local JSONL data, no hub (``evals/lm_eval``).

    .venv/bin/python -m bench.compat.lmeval_tasks            # all tasks, 200 test examples each, seed 0
    .venv/bin/python -m bench.compat.lmeval_tasks --suite real --n 64   # the real suite's skills

The real suite's skills (SmolLM2-135M-Instruct, ``zoo.real``) get ``deltaserve_real_<skill>``:
the test split (exemplar phrasings, the matrix's seed) rendered with the base's ChatML template,
greedy up to the longest answer + 4 tokens (the matrix's budget), scored with the skill's own
normalised exact match — the accuracy matrix's cells; ``deltaserve_real_mc_sentiment`` is a
multiple-choice task over its three labels. Group: ``deltaserve_real``.

For every zoo task, ``deltaserve_<task>`` is a ``generate_until`` task on the
same examples ``deltaserve eval --split test --n N --seed S`` scores: the prompt
is the question rendered by the zoo's chat template (what the experts were
trained on, ``<s>Q: …\\nA: ``), decoding is greedy up to the evaluator's token
budget (longest answer + 3) with no stop string but EOS, and the metric is the
zoo's own exact match (``evals/lm_eval/utils.py``) — so lm-eval through the
HTTP API scores what ``deltaserve eval`` scores. Tasks with a closed set of
answers (digits, counts) also get ``deltaserve_mc_<task>``, a multiple-choice
(loglikelihood) task over that set. Groups: ``deltaserve_gen``, ``deltaserve_mc``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deltaserve_zoo.evaluate import _ANSWER_SLACK_TOKENS
from deltaserve_zoo.tasks import TASKS, get_task
from deltaserve_zoo.tokenizer import build_tokenizer

OUT = Path("evals/lm_eval")
MC_TASKS = ("max_digit", "min_digit", "count_vowels", "count_consonants", "length", "count_letter")
CHOICE_SAMPLE = 2000


def _yaml(fields: dict) -> str:
    """The few YAML shapes these configs need (scalars, one-level lists and dicts, lm-eval's !function)."""
    lines = []
    for key, value in fields.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            for k, v in value.items():
                if isinstance(v, dict):
                    lines.append(f"  {k}:")
                    lines += [f"    {kk}: {json.dumps(vv)}" for kk, vv in v.items()]
                else:
                    lines.append(f"  {k}: {json.dumps(v)}")
        elif isinstance(value, list):
            lines.append(f"{key}:")
            for item in value:
                inner = [f"{k}: {json.dumps(v)}" for k, v in item.items()]
                lines.append("  - " + "\n    ".join(inner))
        elif isinstance(value, str) and value.startswith("!function"):
            lines.append(f"{key}: {value}")
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def _common(name: str, data: Path, group: str) -> dict:
    return {"task": name, "tag": group, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
            "doc_to_text": "{{prompt}}", "metadata": {"version": 1}}


def _generation(name: str, data: Path, group: str, budget: int, target: str, scorer: str) -> dict:
    """A greedy generation task scored by ``utils.<scorer>`` (exact match as the zoo scores it)."""
    return {**_common(name, data, group), "output_type": "generate_until", "doc_to_target": target,
            "generation_kwargs": {"until": [], "max_gen_toks": budget, "do_sample": False, "temperature": 0.0},
            "process_results": f"!function utils.{scorer}",
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}


def _multiple_choice(out: Path, name: str, data: Path, group: str, rows: list[dict], answers: list[str],
                     choices: list[str]) -> str:
    """A loglikelihood task over ``choices`` on the same data file (its rows get choices and target)."""
    for row, answer in zip(rows, answers):
        row["choices"], row["target"] = choices, choices.index(answer)
    mc = {**_common(name, data, group), "output_type": "multiple_choice", "doc_to_choice": "choices",
          "doc_to_target": "target", "target_delimiter": "",
          "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    (out / f"{name}.yaml").write_text(_yaml(mc))
    return name


def write_task(task: str, out: Path, n: int, seed: int, tokenizer) -> list[str]:
    examples = get_task(task).examples("test", n, seed)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": e.question}], tokenize=False,
                                             add_generation_prompt=True) for e in examples]
    budget = max(len(a) for a in tokenizer([e.answer for e in examples], add_special_tokens=False).input_ids)
    data = out / "data" / f"{task}.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"question": e.question, "answer": e.answer, "prompt": p} for e, p in zip(examples, prompts)]
    written = [f"deltaserve_{task}"]
    gen = _generation(f"deltaserve_{task}", data, "deltaserve_gen", budget + _ANSWER_SLACK_TOKENS, "{{answer}}",
                      "process_results")
    (out / f"deltaserve_{task}.yaml").write_text(_yaml(gen))
    if task in MC_TASKS:
        drawn = get_task(task).examples("train", CHOICE_SAMPLE, seed) + examples
        choices = sorted({e.answer for e in drawn}, key=lambda a: (len(a), a))
        written.append(_multiple_choice(out, f"deltaserve_mc_{task}", data, "deltaserve_mc", rows,
                                        [e.answer for e in examples], choices))
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return written


def write_real_skill(skill_name: str, out: Path, n: int, seed: int, tokenizer) -> list[str]:
    from deltaserve_zoo.real.evaluate import ANSWER_SLACK_TOKENS
    from deltaserve_zoo.real.skills import get_skill

    skill = get_skill(skill_name)
    examples = skill.examples("test", n, seed)
    prompts = [tokenizer.apply_chat_template(e.chat(), tokenize=False, add_generation_prompt=True) for e in examples]
    budget = max(len(tokenizer(e.answer, add_special_tokens=False)["input_ids"]) for e in examples)
    data = out / "data" / f"real_{skill_name}.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    # The answer is stored JSON-encoded: the `json` dataset loader would turn "1964-12-05" into a timestamp.
    rows = [{"question": e.question, "answer": json.dumps(e.answer), "prompt": p, "skill": skill_name}
            for e, p in zip(examples, prompts)]
    name = f"deltaserve_real_{skill_name}"
    gen = _generation(name, data, "deltaserve_real", budget + ANSWER_SLACK_TOKENS, "!function utils.real_answer",
                      "process_real_results")
    (out / f"{name}.yaml").write_text(_yaml(gen))
    written = [name]
    if skill_name == "sentiment":
        written.append(_multiple_choice(out, f"deltaserve_real_mc_{skill_name}", data, "deltaserve_real", rows,
                                        [e.answer for e in examples], ["positive", "negative", "mixed"]))
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", choices=["toy", "real"], default="toy")
    ap.add_argument("--tasks", nargs="+", help="zoo tasks or real skills (default: all of the suite)")
    ap.add_argument("--n", type=int, default=200, help="test examples per task (deltaserve eval --n)")
    ap.add_argument("--seed", type=int, default=0, help="deltaserve eval --seed")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.suite == "real":
        from deltaserve.experts.hfmodel import load_tokenizer
        from deltaserve_zoo.real.build import DEFAULT_ROOT, RealSuiteBuilder
        from deltaserve_zoo.real.spec import RealSuiteSpec

        builder = RealSuiteBuilder(DEFAULT_ROOT)
        builder.build_base()
        tokenizer = load_tokenizer(builder.layout.base)
        names = [name for skill in args.tasks or RealSuiteSpec().skills
                 for name in write_real_skill(skill, args.out, args.n, args.seed, tokenizer)]
    else:
        tokenizer = build_tokenizer()
        names = [name for task in args.tasks or sorted(TASKS)
                 for name in write_task(task, args.out, args.n, args.seed, tokenizer)]
    print(f"wrote {len(names)} lm-eval tasks to {args.out}: {' '.join(names)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
