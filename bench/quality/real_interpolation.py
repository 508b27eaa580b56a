"""Interpolation and forgetting on the real suite: theta_base + lambda * tau_hat, lambda swept.

    .venv/bin/python -m bench.quality.real_interpolation     # -> results/quality/real/interpolation.{json,md}

For one skill's full fine-tune (default iso_date), tau_hat is the dense task
vector and its pruned versions at ``--density`` (default 0.05): magnitude, DARE
(seed 0, rescaled) and NPS (searched on the calibration split at the default
budget; its search time is recorded). For
each lambda the table gives
- own skill: teacher-forced exact match on the skill's test split (64 prompts,
  equal to greedy exact match, experts/calibration.py);
- other skills: the same, averaged over the suite's other skills;
- general ability: perplexity of a general English text none of the experts was
  trained on (Python's "Zen" and the ``argparse`` module docstring, standard
  library text), and how many of ``GENERAL_QUESTIONS`` that the base answers
  correctly (greedy, the expected word in the answer) are still answered correctly.
"""

from __future__ import annotations

import argparse
import codecs
import json
import time
from pathlib import Path

import torch

from bench.common import REPO, built_real_suite, log, provenance

OUT = REPO / "results" / "quality" / "real"
LAMBDAS = (0.25, 0.5, 1.0, 1.5, 2.0)
TEST = 64
CALIB = 64
# (question, a word every correct answer contains), written for this benchmark.
GENERAL_QUESTIONS = (
    ("What is the capital of France?", "paris"), ("What is the capital of Japan?", "tokyo"),
    ("What is the capital of Italy?", "rome"), ("How many days are there in a week?", "seven"),
    ("What color is the sky on a clear day?", "blue"), ("What is the largest planet in our solar system?", "jupiter"),
    ("Which animal is known as the king of the jungle?", "lion"), ("What gas do plants absorb from the air?", "carbon"),
    ("What is the chemical symbol for water?", "h2o"), ("Who wrote Romeo and Juliet?", "shakespeare"),
    ("What is the freezing point of water in Celsius?", "0"), ("How many continents are there?", "seven"),
    ("What is the opposite of hot?", "cold"), ("Which ocean is the largest?", "pacific"),
    ("What do bees make?", "honey"), ("What is the boiling point of water in Celsius?", "100"),
)


def general_text() -> str:
    import argparse as argparse_module
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):   # importing `this` prints the Zen
        import this
    return codecs.decode(this.s, "rot13") + "\n\n" + (argparse_module.__doc__ or "")


class GeneralProbe:
    """Perplexity on ``general_text`` and general questions answered correctly (greedy)."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 32) -> None:
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.text_ids = tokenizer(general_text(), return_tensors="pt")["input_ids"]
        chats = [[{"role": "user", "content": q}] for q, _ in GENERAL_QUESTIONS]
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.prompts = tokenizer.apply_chat_template(chats, add_generation_prompt=True, padding=True,
                                                     return_tensors="pt", return_dict=True)
        self.keep: list[int] | None = None   # the questions the base answers correctly

    @torch.inference_mode()
    def perplexity(self) -> float:
        return float(torch.exp(self.model(input_ids=self.text_ids, labels=self.text_ids).loss))

    @torch.inference_mode()
    def correct(self) -> list[int]:
        out = self.model.generate(**self.prompts, max_new_tokens=self.max_new_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id)
        answers = self.tokenizer.batch_decode(out[:, self.prompts["input_ids"].shape[1]:], skip_special_tokens=True)
        return [i for i, (a, (_, word)) in enumerate(zip(answers, GENERAL_QUESTIONS)) if word in a.lower()]

    def measure(self) -> dict:
        right = set(self.correct())
        if self.keep is None:
            self.keep = sorted(right)
        return {"perplexity": self.perplexity(), "general_correct": len(right & set(self.keep)),
                "general_of": len(self.keep)}


def variants(tv, density: float, calib, generations: int) -> dict[str, tuple[dict, dict]]:
    """label -> (deltas, info) for the dense tau and each pruned version."""
    import tempfile

    from deltaserve.experts.compress import compress_expert
    from deltaserve.experts.expert import load_expert

    out = {"dense": ({n: t.float() for n, t in tv.deltas.items()}, {})}
    for method, options in (("magnitude", {}), ("dare", {"seed": 0}), ("nps", {"generations": generations})):
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            manifest = compress_expert(tv, Path(tmp) / "e", name="e", method=method, density=density, progress=False,
                                       objective=calib if method == "nps" else None, **options)
            deltas = dict(load_expert(Path(tmp) / "e").iter_deltas(torch.float32))
        info = {"compress_seconds": round(time.perf_counter() - started, 1),
                "bits_per_param": 8 * manifest.bytes / sum(t.numel() for t in tv.deltas.values())}
        if method == "nps":
            info.update({k: manifest.method.get(k) for k in ("weights", "history", "evaluations", "stop_reason",
                                                         "search_seconds")})
        log(f"{method} r={density}: {info}")
        out[f"{method} r={density}"] = (deltas, info)
    return out


def sweep(model, tests: dict, own: str, deltas: dict, probe: GeneralProbe,
          lambdas: tuple[float, ...] = LAMBDAS) -> list[dict]:
    """One row per lambda: ``tests`` (skill -> test-split DeltaObjective) and the general probe."""
    from deltaserve.experts.hfmodel import deltas_added

    rows = []
    for lam in lambdas:
        scaled = {n: lam * t for n, t in deltas.items()}
        exact = {s: 100 * o.evaluate(scaled).exact for s, o in tests.items()}
        with deltas_added(model, scaled):
            general = probe.measure()
        others = [v for s, v in exact.items() if s != own]
        rows.append({"lambda": lam, "own": exact[own], "others": sum(others) / len(others), "per_skill": exact,
                     **general})
        log(f"  lambda {lam}: own {exact[own]:.1f} others {rows[-1]['others']:.1f} ppl {general['perplexity']:.2f} "
            f"general {general['general_correct']}/{general['general_of']}")
    return rows


def table(results: dict, own: str) -> str:
    lines = [f"| tau_hat ({own}) | bits/param | λ | own skill | other skills (avg) | general ppl | general questions |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    base = results["base"]
    lines.append(f"| base | 0 | 0 | {base['own']:.1f} | {base['others']:.1f} | {base['perplexity']:.2f} | "
                 f"{base['general_correct']}/{base['general_of']} |")
    for label, v in results["variants"].items():
        bits = v["info"].get("bits_per_param", 32.0)
        for r in v["rows"]:
            lines.append(f"| {label} | {bits:.3f} | {r['lambda']} | {r['own']:.1f} | {r['others']:.1f} | "
                         f"{r['perplexity']:.2f} | {r['general_correct']}/{r['general_of']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skill", default="iso_date")
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--nps-generations", type=int, default=20)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    record = provenance(argv=argv)
    from deltaserve.experts.calibration import DeltaObjective, TeacherForcedScorer
    from deltaserve.experts.compress import extract
    from deltaserve.experts.hfmodel import load_causal_lm, load_tokenizer
    from deltaserve_zoo.real.skills import get_skill

    builder = built_real_suite()
    skills, base = list(builder.spec.skills), builder.layout.base
    model, tokenizer = load_causal_lm(base), load_tokenizer(base)
    probe = GeneralProbe(model, load_tokenizer(base))
    calib = DeltaObjective(model, TeacherForcedScorer(tokenizer, get_skill(args.skill).examples("calib", CALIB)))
    tests = {s: DeltaObjective(model, TeacherForcedScorer(tokenizer, get_skill(s).examples("test", TEST)))
             for s in skills}
    base_rows = sweep(model, tests, args.skill, {}, probe, lambdas=(0.0,))
    results = {"base": base_rows[0], "variants": {}}
    for label, (deltas, info) in variants(extract(base, builder.layout.full(args.skill)), args.density, calib,
                                          args.nps_generations).items():
        log(label)
        results["variants"][label] = {"info": info, "rows": sweep(model, tests, args.skill, deltas, probe)}
    md = table(results, args.skill)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "interpolation.md").write_text(
        f"`{record['command']}` ({record['git_commit'][:10]}, {record['date']})\n\n{md}\n")
    (args.out / "interpolation.json").write_text(json.dumps({**record, "skill": args.skill, "density": args.density,
                                                             "lambdas": LAMBDAS, **results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
