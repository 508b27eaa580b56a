"""Choose the real suite's fine-tuning hyper-parameters on the calib split (never on test).

    python -m zoo.real.tune --kind full --lr 3e-5 1e-4 --steps 20
    python -m zoo.real.tune --kind lora --lr 1e-3 3e-3 --steps 30 --rank 8

For every skill and every (lr, steps) it trains the expert exactly as the
builder would (same data, seeds and trainer) and reports teacher-forced exact
match on 64 calib examples with exemplar phrasings and with held-out phrasings,
plus the final loss and the training time. Results are appended to
``<root>/tune.jsonl`` and printed as a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from deltaserve_zoo.real.spec import LoraTrainSpec, RealSuiteSpec, TrainSpec
from deltaserve_zoo.real.train import calib_accuracy, train_full, train_lora

DEFAULT_ROOT = Path(".cache/zoo/real")


def run_one(base_dir: Path, kind: str, skill: str, spec: TrainSpec, seed: int, n_calib: int) -> dict:
    started = time.perf_counter()
    train = train_full if kind == "full" else train_lora
    model, tokenizer, loss = train(base_dir, skill, spec, seed, progress=False)
    seconds = time.perf_counter() - started
    return {"kind": kind, "skill": skill, **spec.model_dump(mode="json"), "loss": round(loss, 4),
            "train_s": round(seconds, 1),
            "calib": calib_accuracy(model, tokenizer, skill, n_calib, seed),
            "calib_heldout": calib_accuracy(model, tokenizer, skill, n_calib, seed, phrasings="heldout")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--kind", choices=("full", "lora"), required=True)
    parser.add_argument("--lr", type=float, nargs="+", required=True)
    parser.add_argument("--steps", type=int, nargs="+", required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--skills", nargs="+", default=list(RealSuiteSpec().skills))
    parser.add_argument("--calib", type=int, default=64, help="calib examples per skill")
    args = parser.parse_args(argv)

    from deltaserve_zoo.real.build import RealSuiteBuilder

    builder = RealSuiteBuilder(args.root)
    builder.build_base()
    table = Table(title=f"{args.kind} fine-tunes, calib split (teacher-forced exact match)")
    for column in ("skill", "lr", "steps", "loss", "calib", "calib held-out", "train s"):
        table.add_column(column)
    for skill in args.skills:
        for lr in args.lr:
            for steps in args.steps:
                fields = {"steps": steps, "batch_size": args.batch_size, "lr": lr}
                spec = LoraTrainSpec(rank=args.rank, alpha=2 * args.rank, **fields) if args.kind == "lora" \
                    else TrainSpec(**fields)
                row = run_one(builder.layout.base, args.kind, skill, spec, builder.spec.seed, args.calib)
                with open(args.root / "tune.jsonl", "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
                table.add_row(skill, f"{lr:g}", str(steps), f"{row['loss']:.3f}", f"{row['calib']:.1%}",
                              f"{row['calib_heldout']:.1%}", f"{row['train_s']:.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
