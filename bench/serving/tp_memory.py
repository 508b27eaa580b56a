"""Per-rank host memory of a tensor-parallel server: TP=1 against TP=2, side by side in one run.

    .venv/bin/python -m bench.serving.tp_memory --out results/serving/tp_memory.json

On a random Llama of ~120 M parameters (zoo.families: hidden 1024, 8 layers, 16 heads, 4 KV heads, vocabulary
32,000, float32 ≈ 0.5 GB; SmolLM2-135M's 9 heads do not split over two ranks) with one random sparse expert on
embeddings, attention and MLP matrices, each server is started, answers the base, serves the expert (a dense
swap), and serves the base again; after each step every vLLM worker process (one per rank) is measured:
RSS, USS (pages only it maps) and PSS (shared pages divided among the processes that map them). The rows
and the ratios TP=2 / TP=1 per rank go to the table and the JSON. vLLM-CPU's KV cache is 2 GiB per rank
(``VLLM_CPU_KVCACHE_SPACE``, bench.servers), the same for both, and counts in every number.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.common import REPO, log, provenance
from bench.servers import start_server, stop_server

SHAPE = {"hidden": 1024, "layers": 8, "heads": 16, "kv_heads": 4, "head_dim": 64, "intermediate": 2816,
         "vocab": 32000}
TOUCHED = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
           "model.layers.0.self_attn.k_proj.weight", "model.layers.3.self_attn.o_proj.weight",
           "model.layers.5.mlp.down_proj.weight", "model.layers.7.mlp.gate_proj.weight")
STEPS = (("idle", "base"), ("dense swap", "sparse"), ("base again", "base"))


def workers(server) -> list:
    """The server's vLLM worker processes (one per rank), by their process titles."""
    import psutil

    found = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
             if "Worker" in " ".join(p.cmdline())]
    return sorted(found, key=lambda p: " ".join(p.cmdline()))


def memory(processes: list) -> list[dict]:
    out = []
    for p in processes:
        info = p.memory_full_info()
        out.append({"process": " ".join(p.cmdline())[:40], "rss_mib": info.rss / 2**20, "uss_mib": info.uss / 2**20,
                    "pss_mib": info.pss / 2**20})
    return out


def ask(server, model: str) -> str:
    import httpx

    r = httpx.post(server.url + "/v1/chat/completions", timeout=300, json={
        "model": model, "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": "Say hi"}]})
    r.raise_for_status()
    return r.json()["deltaserve"]["path"]


def measure(base: Path, store: Path, work: Path, tp: int) -> list[dict]:
    server, _ = start_server(base, store, work / f"server-tp{tp}.log", ["--tensor-parallel-size", str(tp)])
    try:
        rows = []
        for step, model in STEPS:
            path = ask(server, model)
            time.sleep(2)
            for rank, row in enumerate(memory(workers(server))):
                rows.append({"tp": tp, "step": step, "served": path, "rank": rank, **row})
        return rows
    finally:
        stop_server(server)


def tp_base() -> Path:
    """The random Llama of SHAPE (zoo.families, cached): its 16 heads and 4 KV heads split over 2, 4 or 8 ranks."""
    from deltaserve_zoo.families import Shape, random_checkpoint

    return random_checkpoint("llama", REPO / ".cache" / "zoo" / "families" / "llama-tp-memory", Shape(**SHAPE))


def setup(work: Path) -> tuple[Path, Path]:
    from deltaserve.experts.store import ExpertStore
    from deltaserve_zoo.real.synthetic import random_sparse_expert

    base = tp_base()
    store = work / "store"
    ExpertStore(store, base).import_source("sparse", random_sparse_expert(base, work / "sparse", TOUCHED, 0.01))
    return base, store


def table(rows: list[dict]) -> dict:
    print("| TP | step | served | rank | RSS MiB | USS MiB | PSS MiB |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['tp']} | {r['step']} | {r['served']} | {r['rank']} | {r['rss_mib']:.0f} | {r['uss_mib']:.0f} | "
              f"{r['pss_mib']:.0f} |")
    ratios = {}
    for step, _ in STEPS:
        one = [r for r in rows if r["tp"] == 1 and r["step"] == step]
        two = [r for r in rows if r["tp"] == 2 and r["step"] == step]
        if one and two:
            ratios[step] = {k: sum(r[k] for r in two) / len(two) / one[0][k] for k in ("rss_mib", "uss_mib", "pss_mib")}
            print(f"{step}: per-rank TP=2 / TP=1: " + ", ".join(f"{k[:3].upper()} {v:.2f}"
                                                                 for k, v in ratios[step].items()))
    return ratios


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    record = provenance(argv=argv)
    with tempfile.TemporaryDirectory(prefix="deltaserve-tp-") as tmp:
        base, store = setup(Path(tmp))
        rows = [row for tp in (1, 2) for row in measure(base, store, Path(tmp), tp)]
    log("done")
    result = {**record, "model": SHAPE, "touched": TOUCHED, "rows": rows, "ratios_tp2_over_tp1": table(rows)}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
