"""The two sparse codecs side by side: bitmask ``sparse`` vs Elias–Fano ``sparse_ef`` (experts.codecs.sparse_ef).

Bytes: for every density r of ``--densities``, one random tensor of ``--bytes-shape``
with exactly round(r * n) non-zeros at uniform positions (fp16 values) is encoded
by both codecs; bits/param = 8 * nbytes(parts) / n, the exact stored bytes. The
row also gives the positions' share and log2 C(n, m) / n, the fewest bits/param
any code of m uniform positions among n can average (values excluded).

Time: ``add_into`` (in place ``W += 0.7 * decode(parts)``, the dense path's
decode-and-add) of each codec at ``--density`` onto a random target of every
``--shapes`` entry. The calls alternate (sparse, sparse_ef, sparse, ...) so
both see the same machine; one warm-up each, then ``--repeat`` timed calls;
median and min reported. ``--threads`` sets torch's intra-op threads (1 by
default, as the repo's other CPU benchmarks: on a loaded machine more threads
mostly add OpenMP waits, see results/kernels/README.md).

    .venv/bin/python -m bench.kernels.sparse_codecs --out results/kernels/cpu_sparse_codecs.json
    .venv/bin/python -m bench.kernels.sparse_codecs --device cuda --out results/kernels/gpu_sparse_codecs.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from bench.common import provenance
from deltaserve.experts.codecs import get_codec

CODECS = ("sparse", "sparse_ef")
DENSITIES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
WEIGHT = 0.7


def parse_shape(text: str) -> tuple[int, int]:
    rows, cols = (int(x) for x in text.lower().split("x"))
    return rows, cols


def sparse_tensor(shape: tuple[int, int], kept: int, order: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Zeros with ``kept`` N(0, 1e-3) values at the first ``kept`` positions of the permutation ``order``."""
    flat = torch.zeros(math.prod(shape))
    flat[order[:kept]] = torch.randn(kept, generator=generator) * 1e-3
    return flat.view(shape)


def position_entropy_bits(numel: int, kept: int) -> float:
    """log2 C(numel, kept): the bits that name one subset of ``kept`` positions."""
    return (math.lgamma(numel + 1) - math.lgamma(kept + 1) - math.lgamma(numel - kept + 1)) / math.log(2)


def bytes_rows(shape: tuple[int, int], densities: list[float], value_dtype: torch.dtype) -> list[dict]:
    numel = math.prod(shape)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(numel, generator=gen)  # a prefix of a random permutation is a uniform subset
    rows = []
    for density in densities:
        kept = round(density * numel)
        tensor = sparse_tensor(shape, kept, order, gen)
        bits = {name: 8 * get_codec(name).nbytes(get_codec(name).encode(tensor, value_dtype=value_dtype)) / numel
                for name in CODECS}
        values_bits = 8 * kept * value_dtype.itemsize / numel
        rows.append({"density": density, "shape": list(shape), "kept": kept,
                     "sparse_bits_per_param": bits["sparse"], "sparse_ef_bits_per_param": bits["sparse_ef"],
                     "ratio": bits["sparse_ef"] / bits["sparse"],
                     "sparse_position_share": 1 - values_bits / bits["sparse"],
                     "sparse_ef_position_share": 1 - values_bits / bits["sparse_ef"],
                     "sparse_ef_index_bits_per_kept": (bits["sparse_ef"] - values_bits) * numel / max(kept, 1),
                     "position_entropy_bits_per_param": position_entropy_bits(numel, kept) / numel})
    return rows


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def add_into_row(shape: tuple[int, int], args: argparse.Namespace) -> dict:
    """Median/min seconds of ``add_into`` for both codecs on one target shape, calls interleaved."""
    numel = math.prod(shape)
    gen = torch.Generator().manual_seed(1)
    tensor = sparse_tensor(shape, round(args.density * numel), torch.randperm(numel, generator=gen), gen)
    encoded = {name: get_codec(name).encode(tensor, value_dtype=args.value_dtype) for name in CODECS}
    parts = {name: {k: v.to(args.device) for k, v in encoded[name].items()} for name in CODECS}
    target = torch.randn(shape, generator=gen).to(device=args.device, dtype=args.target_dtype)
    seconds: dict[str, list[float]] = {name: [] for name in CODECS}
    for step in range(args.repeat + 1):
        for name in CODECS:
            sync(args.device)
            start = time.perf_counter()
            get_codec(name).add_into(target, parts[name], WEIGHT)
            sync(args.device)
            if step:   # step 0 is the warm-up
                seconds[name].append(time.perf_counter() - start)
    row = {"shape": list(shape), "density": args.density, "target_dtype": str(args.target_dtype).removeprefix("torch."),
           "repeat": args.repeat}
    for name in CODECS:
        row[f"{name}_median_ms"] = 1e3 * statistics.median(seconds[name])
        row[f"{name}_min_ms"] = 1e3 * min(seconds[name])
        row[f"{name}_bits_per_param"] = 8 * get_codec(name).nbytes(parts[name]) / numel
    row["ratio_median"] = row["sparse_ef_median_ms"] / row["sparse_median_ms"]
    return row


def print_tables(bytes_table: list[dict], time_table: list[dict]) -> None:
    print("| density | sparse bits/param (positions %) | sparse_ef bits/param (positions %) | sparse_ef / sparse "
          "| sparse_ef index bits/kept | log2 C(n,m)/n |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in bytes_table:
        print(f"| {r['density']:g} | {r['sparse_bits_per_param']:.4f} ({100 * r['sparse_position_share']:.0f} %) | "
              f"{r['sparse_ef_bits_per_param']:.4f} ({100 * r['sparse_ef_position_share']:.0f} %) | {r['ratio']:.3f} | "
              f"{r['sparse_ef_index_bits_per_kept']:.2f} | {r['position_entropy_bits_per_param']:.4f} |")
    print()
    print("| target | density | sparse ms (median / min) | sparse_ef ms (median / min) | sparse_ef / sparse (median) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in time_table:
        print(f"| {r['shape'][0]}x{r['shape'][1]} {r['target_dtype']} | {r['density']:g} | "
              f"{r['sparse_median_ms']:.2f} / {r['sparse_min_ms']:.2f} | "
              f"{r['sparse_ef_median_ms']:.2f} / {r['sparse_ef_min_ms']:.2f} | {r['ratio_median']:.2f} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    ap.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES), help="densities of the bytes table")
    ap.add_argument("--bytes-shape", type=parse_shape, default=(4096, 4096))
    ap.add_argument("--density", type=float, default=0.01, help="density of the add_into timing")
    ap.add_argument("--shapes", type=parse_shape, nargs="+", default=[(4096, 4096), (576, 1536)])
    ap.add_argument("--target-dtype", type=lambda s: getattr(torch, s), default=torch.float32)
    ap.add_argument("--value-dtype", type=lambda s: getattr(torch, s), default=torch.float16)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--out", type=Path)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    record = provenance(argv=argv)
    load_start = os.getloadavg()
    bytes_table = bytes_rows(args.bytes_shape, args.densities, args.value_dtype)
    time_table = [add_into_row(shape, args) for shape in args.shapes]
    print_tables(bytes_table, time_table)
    cuda = args.device.startswith("cuda")
    name = torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**record, "device": args.device, "device_name": name, "threads": args.threads,
                                        "value_dtype": str(args.value_dtype).removeprefix("torch."),
                                        "loadavg_1m_start": load_start[0], "loadavg_1m_end": os.getloadavg()[0],
                                        "bytes": bytes_table, "add_into": time_table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
