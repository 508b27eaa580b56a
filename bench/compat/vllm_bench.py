"""``vllm bench serve`` against deltaserve and against plain ``vllm serve``, alternating, on the same base.

    .venv/bin/python -m bench.compat.vllm_bench                 # micro zoo, 3 rounds
    -> results/compat/vllm_bench.json (+ the raw bench results under results/compat/vllm_bench/)

Each round benches, for completions and chat, the base and a LoRA adapter,
deltaserve then vLLM (vLLM first in odd rounds), with vLLM's random dataset
(fixed seed, ``--ignore-eos``, so both servers generate the same token counts).
Reported per case: the median over rounds of each server's output throughput
and TTFT, the deltaserve/vLLM throughput ratio, and whether vLLM's bench warned
that ``/tokenize`` was unavailable (it aligns its prompts through it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench.common import REPO, log, provenance
from bench.compat.pair import ENGINE_ENV, vllm_and_deltaserve

OUT = REPO / "results" / "compat"
ENDPOINTS = {"completions": ("openai", "/v1/completions"), "chat": ("openai-chat", "/v1/chat/completions")}
TOKENIZE_WARNING = "/tokenize unavailable"


def bench_once(url: str, endpoint: str, model: str, tokenizer: Path, args, out: Path) -> dict:
    backend, path = ENDPOINTS[endpoint]
    cmd = [sys.executable, "-m", "bench.compat.vllm_cli", "bench", "serve", "--backend", backend, "--base-url", url,
           "--endpoint", path, "--model", model, "--tokenizer", str(tokenizer), "--dataset-name", "random",
           "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
           "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency), "--ignore-eos",
           "--seed", "0", "--temperature", "0", "--disable-tqdm", "--save-result", "--result-dir", str(out.parent),
           "--result-filename", out.name, "--percentile-metrics", "ttft,tpot,itl,e2el"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **ENGINE_ENV}, check=False)
    if run.returncode != 0:
        raise SystemExit(f"vllm bench serve failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    result = json.loads(out.read_text())
    keep = ("request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
            "mean_tpot_ms", "median_tpot_ms", "completed", "total_output_tokens")
    row = {k: result.get(k) for k in keep}
    row["tokenize_warning"] = TOKENIZE_WARNING in run.stdout + run.stderr
    return row


def summarize(runs: list[dict]) -> list[dict]:
    cases = sorted({(r["endpoint"], r["model"]) for r in runs})
    out = []
    for endpoint, model in cases:
        row = {"endpoint": endpoint, "model": model}
        for server in ("deltaserve", "vllm"):
            mine = [r for r in runs if (r["endpoint"], r["model"], r["server"]) == (endpoint, model, server)]
            for key in ("output_throughput", "median_ttft_ms", "median_tpot_ms"):
                row[f"{server}_{key}"] = round(statistics.median(r[key] for r in mine), 2)
            row[f"{server}_tokenize_warning"] = any(r["tokenize_warning"] for r in mine)
        row["throughput_ratio"] = round(row["deltaserve_output_throughput"] / row["vllm_output_throughput"], 3)
        row["ttft_ratio"] = round(row["deltaserve_median_ttft_ms"] / row["vllm_median_ttft_ms"], 3)
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", type=Path, default=REPO / ".cache" / "zoo" / "micro")
    ap.add_argument("--task", default="max_digit", help="the zoo task whose LoRA adapter is benched")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--work", type=Path, default=REPO / ".cache" / "bench" / "compat")
    ap.add_argument("--out", type=Path, default=OUT / "vllm_bench.json")
    args = ap.parse_args(argv)
    raw = args.out.parent / "vllm_bench"
    raw.mkdir(parents=True, exist_ok=True)
    runs = []
    with vllm_and_deltaserve(args.zoo, [args.task], args.work) as servers:
        models = ["base", *servers.loras]
        for rnd in range(args.rounds):
            order = ("deltaserve", "vllm") if rnd % 2 == 0 else ("vllm", "deltaserve")
            for endpoint in ENDPOINTS:
                for model in models:
                    for server in order:
                        url = servers.deltaserve if server == "deltaserve" else servers.vllm
                        name = f"{server}-{endpoint}-{model}-r{rnd}.json"
                        row = bench_once(url, endpoint, model, servers.base, args, raw / name)
                        runs.append({"round": rnd, "server": server, "endpoint": endpoint, "model": model, **row})
                        log(f"round {rnd} {endpoint:11s} {model:16s} {server:10s} "
                            f"{row['output_throughput']:8.1f} tok/s  ttft {row['median_ttft_ms']:7.1f} ms")
    result = {"provenance": provenance(argv=argv),
              "setup": {"zoo": str(args.zoo.relative_to(REPO)) if args.zoo.is_relative_to(REPO) else str(args.zoo),
                        "num_prompts": args.num_prompts, "input_len": args.input_len,
                        "output_len": args.output_len, "concurrency": args.concurrency, "rounds": args.rounds,
                        "dataset": "random (seed 0, --ignore-eos, temperature 0)"},
              "summary": summarize(runs), "runs": runs}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for row in result["summary"]:
        log(f"{row['endpoint']:11s} {row['model']:16s} ratio {row['throughput_ratio']:.3f}  "
            f"ttft ds {row['deltaserve_median_ttft_ms']} / vllm {row['vllm_median_ttft_ms']} ms  "
            f"tokenize warning ds={row['deltaserve_tokenize_warning']} vllm={row['vllm_tokenize_warning']}")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
