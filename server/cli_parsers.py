"""The subcommands' arguments (server.cli wires them to their handlers)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

DEFAULT_ZOO_ROOT = Path(".cache/zoo")


def add_all(sub, handlers: dict[str, Callable], add_option_flags: Callable) -> None:
    from deltaserve.experts.compress import COMPRESSORS
    from deltaserve.experts.merge.registry import METHOD_ALIASES
    from deltaserve.experts.merge import MERGE_METHODS

    _zoo(sub, handlers)
    _compress(sub.add_parser("compress", help="compress a fine-tune or LoRA into an expert directory"), COMPRESSORS,
              add_option_flags, handlers["compress"])

    mrg = sub.add_parser("merge", help="merge experts into the base and write a loadable HF checkpoint")
    mrg.add_argument("--base", type=Path, required=True)
    mrg.add_argument("--experts", type=Path, nargs="+", required=True, help="expert directories")
    mrg.add_argument("--method", choices=sorted([*MERGE_METHODS, *METHOD_ALIASES]), default="task_arithmetic")
    mrg.add_argument("--weights", type=float, nargs="+", help="one per expert (default 1.0 each)")
    mrg.add_argument("--scale", type=float, default=1.0, help="lambda: theta = base + lambda * merged")
    mrg.add_argument("--out", type=Path, required=True, help="output HF checkpoint directory")
    add_option_flags(mrg, MERGE_METHODS, "merge options")
    mrg.set_defaults(func=handlers["merge"])

    ins = sub.add_parser("inspect", help="show an expert's kind, density, bytes, bits/param and provenance")
    ins.add_argument("expert", type=Path)
    ins.add_argument("--verify", action="store_true", help="also check file digests and decode every tensor")
    ins.set_defaults(func=handlers["inspect"])

    met = sub.add_parser("methods", help="list compressors, codecs, merge methods and routers with their options")
    met.set_defaults(func=handlers["methods"])

    from deltaserve.server.serve import add_serve_arguments

    srv = sub.add_parser("serve", help="serve the base and the store's experts over an OpenAI-compatible API")
    add_serve_arguments(srv)
    srv.set_defaults(func=handlers["serve"])

    dem = sub.add_parser("demo", help="build the real suite (SmolLM2-135M-Instruct + skill experts), publish its "
                                      "experts into a store and serve them with routing")
    add_serve_arguments(dem, demo=True)
    dem.add_argument("--suite", choices=["real", "toy"], default="real",
                     help="real: SmolLM2-135M-Instruct and its skills; toy: the tests' tiny zoo")
    dem.add_argument("--size", default="demo", help="toy zoo size (with --suite toy)")
    dem.add_argument("--no-serve", action="store_true", help="prepare the store and exit")
    dem.set_defaults(func=handlers["demo"])
    _store(sub, COMPRESSORS, add_option_flags, handlers)


def _zoo(sub, handlers: dict[str, Callable]) -> None:
    zoo = sub.add_parser("zoo", help="build the model zoo, export its task data")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    build = zoo_sub.add_parser("build", help="build (or reuse cached) base, experts, vision suite and matrix")
    build.add_argument("--size", default="demo", help="real (SmolLM2-135M-Instruct suite), or a toy size: micro, demo")
    build.add_argument("--out", type=Path, help=f"output directory (default {DEFAULT_ZOO_ROOT}/SIZE)")
    build.add_argument("--workers", type=int, default=2,
                       help="processes training experts in parallel (each single-threaded)")
    build.set_defaults(func=handlers["zoo_build"])
    data = zoo_sub.add_parser("data", help="write a zoo task's examples as chat-example JSONL")
    data.add_argument("--task", required=True)
    data.add_argument("--split", choices=["train", "calib", "test"], default="calib")
    data.add_argument("--n", type=int, default=64, help="examples")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    data.set_defaults(func=handlers["zoo_data"])

    ev = sub.add_parser("eval", help="exact-match accuracy of a model (optionally + PEFT adapter) on zoo tasks")
    ev.add_argument("--model", type=Path, required=True, help="HF causal LM directory")
    ev.add_argument("--adapter", type=Path, help="PEFT adapter directory applied on top of --model")
    ev.add_argument("--tasks", nargs="+", help="task names (default: all)")
    ev.add_argument("--split", choices=["train", "calib", "test"], default="test")
    ev.add_argument("--n", type=int, default=200, help="examples per task")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", type=Path, help="write the result here instead of stdout")
    ev.set_defaults(func=handlers["eval"])


def _compression_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", type=Path, help="chat-example JSONL the objective scores (nps)")
    p.add_argument("--training", type=Path, help="chat-example JSONL the values are re-trained on (sparse_ft)")
    p.add_argument("--task", help="a label for the expert's skill, recorded in the manifest")


def _compress(comp: argparse.ArgumentParser, compressors, add_option_flags: Callable, handler: Callable) -> None:
    comp.add_argument("--base", type=Path, required=True, help="base HF model directory")
    source = comp.add_mutually_exclusive_group(required=True)
    source.add_argument("--finetuned", type=Path, help="fully fine-tuned HF model directory")
    source.add_argument("--adapter", type=Path, help="PEFT LoRA adapter directory")
    comp.add_argument("--method", choices=sorted(compressors), default="nps")
    _compression_data(comp)
    comp.add_argument("--name", help="expert name (default: the --out directory name)")
    comp.add_argument("--out", type=Path, required=True, help="expert directory to write")
    add_option_flags(comp, compressors, "compression options")
    comp.set_defaults(func=handler)


def _store(sub, compressors, add_option_flags: Callable, handlers: dict[str, Callable]) -> None:
    sto = sub.add_parser("store", help="manage an expert store without a server")
    sto_sub = sto.add_subparsers(dest="store_command", required=True)
    add = sto_sub.add_parser("add", help="register an expert folder, PEFT adapter or HF fine-tune")
    rm = sto_sub.add_parser("rm", help="delete an expert")
    ls = sto_sub.add_parser("list", help="list experts")
    for p in (add, rm, ls):
        p.add_argument("--store", type=Path, required=True)
        p.add_argument("--base", type=Path, required=True)
    add.add_argument("--name", required=True)
    add.add_argument("--source", type=Path, required=True)
    add.add_argument("--method", choices=sorted(compressors), help="compress with this method "
                     "(default: expert folders as is, LoRAs exact, full fine-tunes magnitude 0.05)")
    _compression_data(add)
    add.add_argument("--exemplars", type=Path, help="JSON list of example prompts for the routers")
    add.add_argument("--replace", action="store_true")
    add_option_flags(add, compressors, "compression options")
    add.set_defaults(func=handlers["store_add"])
    rm.add_argument("name")
    rm.set_defaults(func=handlers["store_rm"])
    ls.set_defaults(func=handlers["store_list"])
