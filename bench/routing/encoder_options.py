"""Could a cheaper prompt encoder make routing under concurrency cheap? Accuracy and latency side by side.

For the real suite's six skills (exemplars: 64 calib questions per skill; queries:
64 held-out test questions per skill, phrasings never seen), on one torch thread
as the server's router runs:

* MiniLM (all-MiniLM-L6-v2) in fp32, bf16 (the server's) and int8 (dynamic);
* ``static``: router.static.StaticEncoder (the server's ``--router-encoder
  static``), a static-embedding table distilled from MiniLM (each vocabulary
  token encoded alone, model2vec's idea), a prompt being the mean of its
  tokens' vectors weighted by log(1 + token id) (a frequency proxy).

Per encoder: held-out accuracy of nearest-exemplar routing (knn, top-1) and of a
logistic regression on the exemplars (a gate); p50 ms to encode one question,
and a batch of 32 (the micro-batcher's batch at 32 concurrent requests), and
their ratio — the floor of ``p50 at 32 / p50 alone``.

    .venv/bin/python -m bench.routing.encoder_options     # -> results/routing/encoder_options.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from bench.common import REPO, provenance

OUT = REPO / "results" / "routing" / "encoder_options.json"


def labelled() -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    from deltaserve_zoo.real.skills import get_skill
    from deltaserve_zoo.real.spec import RealSuiteSpec

    ex, ex_labels, qs, q_labels = [], [], [], []
    for name in RealSuiteSpec().skills:
        skill = get_skill(name)
        e = [x.messages[-1][1] for x in skill.examples("calib", 64, seed=11)]
        q = [x.messages[-1][1] for x in skill.examples("test", 64, seed=5, phrasings="heldout")]
        ex, ex_labels, qs, q_labels = ex + e, ex_labels + [name] * len(e), qs + q, q_labels + [name] * len(q)
    return ex, np.array(ex_labels), qs, np.array(q_labels)


def measure(encode, ex, ex_labels, qs, q_labels, repeats: int) -> dict:
    from sklearn.linear_model import LogisticRegression

    E, Q = encode(ex), encode(qs)
    knn = ex_labels[np.argmax(Q @ E.T, axis=1)]
    gate = LogisticRegression(C=10, max_iter=2000).fit(E, ex_labels).predict(Q)
    one, batch = [], []
    for i in range(repeats):
        start = time.perf_counter()
        encode([qs[i]])
        one.append(time.perf_counter() - start)
    for i in range(max(repeats // 4, 3)):
        start = time.perf_counter()
        encode(qs[32 * i:32 * i + 32])
        batch.append(time.perf_counter() - start)
    row = {"knn_acc": float((knn == q_labels).mean()), "gate_acc": float((gate == q_labels).mean()),
           "one_ms": 1000 * statistics.median(one), "batch32_ms": 1000 * statistics.median(batch)}
    row["batch32_vs_one"] = row["batch32_ms"] / row["one_ms"]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--repeats", type=int, default=40)
    args = ap.parse_args(argv)
    record = provenance(argv=argv)
    import torch

    from deltaserve.router import SentenceEncoder
    from deltaserve.router.static import StaticEncoder

    torch.set_num_threads(1)   # as the server runs its router (server.routing)
    ex, ex_labels, qs, q_labels = labelled()
    encoders = {f"minilm-{p}": SentenceEncoder(precision=p, cache_size=0).encode for p in ("fp32", "bf16", "int8")}
    encoders["static"] = StaticEncoder(cache_size=0).encode
    rows = []
    print("| encoder | knn held-out | gate held-out | one ms | batch of 32 ms | ratio |\n"
          "|---|---:|---:|---:|---:|---:|")
    for name, encode in encoders.items():
        row = {"encoder": name, **measure(encode, ex, ex_labels, qs, q_labels, args.repeats)}
        rows.append(row)
        print(f"| {name} | {100 * row['knn_acc']:.1f} % | {100 * row['gate_acc']:.1f} % | {row['one_ms']:.2f} | "
              f"{row['batch32_ms']:.1f} | {row['batch32_vs_one']:.1f} |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**record, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
