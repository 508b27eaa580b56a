"""GPU readiness: one unattended run (<= 8 minutes) that times serving on a CUDA machine.

    bash bench/serving/gpu.sh           # on a CUDA machine with vllm: installs, then runs the line below
    python -m bench.serving.gpu --device cuda --out results/serving/gpu.json
    .venv/bin/python -m bench.serving.gpu --device cpu --quick --out /tmp/gpu-check.json   # the CPU check
    (tests/test_gpu_script.py runs the CPU check against the tests' real-base server: --url)

Steps (each timed; the JSON says how long each took against the budget):

1. the real base (SmolLM2-135M-Instruct from the PyPI GGUF), 4 random LoRAs and 4
   random sparse experts (``zoo.real.synthetic``: speed does not depend on what an
   expert learned, so nothing is trained);
2. serving traffic through ``deltaserve serve`` (bench.serving.traffic, synthetic
   suite): base only, one LoRA, 4 LoRAs mixed, one dense expert, 4 dense recipes
   mixed, ``auto`` (uniform and 70 % one skill) — once with adaptive merging off
   (the LoRA path as vLLM runs it) and once on (a dominant LoRA served merged);
   ratios to base-only traffic, and the dense swap against this device's copy
   bandwidth (the HBM floor on a GPU) with its breakdown — on a GPU the swap is written
   in place, rank by rank (server.worker.loading; the rows say ``swap_mode``); with two
   or more GPUs the mixes again on a random Llama sharded over two of them
   (``serving_tp2``, tensor parallel; SmolLM2's 9 heads do not split in two);
3. the dense path's decode-and-add kernels on a Llama-2-7B-shaped layer stack
   against the same copy bandwidth (bench.kernels.swap).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from bench.common import REPO, log, provenance

OUT = REPO / "results" / "serving" / "gpu.json"
BUDGET_S = 8 * 60


def environment(device: str) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "device": device}
    try:
        import vllm

        env["vllm"] = vllm.__version__
    except ImportError as err:
        raise SystemExit(f"vllm is not installed: {err}") from None
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda, but torch sees no CUDA device (use --device cpu to check the script)")
        env["device_name"] = torch.cuda.get_device_name(0)
        env["device_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return env


def torch_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="few requests and one 7B layer: checks the script runs")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--url", help="serve the mixes on this running server (its store holding the synthetic suite's "
                                  "experts) instead of starting one: the CPU check reuses the tests' server")
    args = ap.parse_args(argv)
    record = {**provenance(argv=argv), "environment": environment(args.device), "budget_s": BUDGET_S}
    from bench.kernels import swap as kernels
    from bench.serving import traffic

    steps: dict[str, float] = {}
    started = time.perf_counter()
    requests, layers = (8, 1) if args.quick else (64, 4)
    # --quick (the CPU check in the tests) runs one server, adaptive on; a real run compares off and on
    traffic_args = traffic.parse_args(["--suite", "synthetic", "--adaptive", "on" if args.quick else "both",
                                       "--device", args.device,
                                       "--requests", str(requests), "--concurrency", "8",
                                       "--warmup", "8" if args.quick else "32",
                                       "--max-tokens", "8" if args.quick else "64",
                                       *(["--url", args.url] if args.url else [])])
    serving = traffic.run(traffic_args, record)
    steps["serving"] = time.perf_counter() - started
    tp_serving = None
    if args.device.startswith("cuda") and not args.url and torch_gpus() >= 2:   # a base over two GPUs
        from bench.serving.tp_memory import tp_base

        tp_args = traffic.parse_args(["--suite", "synthetic", "--base", str(tp_base()), "--adaptive", "on",
                                      "--device", args.device,
                                      "--requests", str(requests), "--concurrency", "8", "--max-tokens", "64",
                                      "--tensor-parallel-size", "2"])
        tp_serving = traffic.run(tp_args, record)
        steps["serving_tp2"] = time.perf_counter() - started - steps["serving"]
    with tempfile.TemporaryDirectory() as tmp:
        kernels.main(["--device", args.device, "--layers", str(layers), "--repeat", "1" if args.quick else "5",
                      "--out", f"{tmp}/k.json"])
        kernel = json.loads(Path(tmp, "k.json").read_text())
    steps["kernels_7b_layers"] = time.perf_counter() - started - sum(steps.values())
    total = time.perf_counter() - started
    log(f"done in {total:.0f} s (budget {BUDGET_S} s): " + ", ".join(f"{k} {v:.0f} s" for k, v in steps.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**record, "steps_s": steps, "total_s": total, "within_budget": total <= BUDGET_S,
                                    "serving": {k: v for k, v in serving.items() if k not in record},
                                    "serving_tp2": tp_serving and {k: v for k, v in tp_serving.items()
                                                                   if k not in record},
                                    "kernels_7b": {k: v for k, v in kernel.items() if k not in record}},
                                   indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
