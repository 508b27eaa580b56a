"""Decode-and-add kernels of the dense path at 7B-model scale: GB/s against the device's copy bandwidth.

For every weight matrix of a Llama-2-7B-shaped model (random bf16 weights) the
dense path does ``W.copy_(W_base); W += w * decode(tau)`` (restore from the base,
then add the expert). This script times exactly that with the repo's codecs
(experts.codecs ``add_into``) for an NPS-style sparse expert (5 % kept, bf16
values) and a T-Switch ternary expert (5 % kept), and compares the achieved
bandwidth with a plain device copy of the same bytes (``dst.copy_(src)``).

Bytes counted per matrix: the restore (read W_base + write W), the add (read and
write the touched rows of W is not separable, so we count the whole W once more
read+write: an upper bound on traffic that the kernel could need) and the
expert's encoded bytes. "GB/s" = counted bytes / seconds; "vs copy" = that
bandwidth / the measured copy bandwidth.

    .venv/bin/python -m bench.kernels.swap --device cuda --layers 32 --out results/kernels/gpu.json
    .venv/bin/python -m bench.kernels.swap --device cpu --layers 2  --out results/kernels/cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from bench.common import best_seconds, copy_bandwidth, provenance
from deltaserve.experts.codecs import get_codec

# Llama-2-7B: hidden 4096, intermediate 11008, 32 layers, vocab 32000.
HIDDEN, INTER, VOCAB = 4096, 11008, 32000
LAYER_SHAPES = [("q", (HIDDEN, HIDDEN)), ("k", (HIDDEN, HIDDEN)), ("v", (HIDDEN, HIDDEN)), ("o", (HIDDEN, HIDDEN)),
                ("gate", (INTER, HIDDEN)), ("up", (INTER, HIDDEN)), ("down", (HIDDEN, INTER))]


def encode_expert(shape, density: float, kind: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    numel = shape[0] * shape[1]
    tau = torch.zeros(numel, dtype=torch.float32)
    idx = torch.randperm(numel, generator=generator)[: int(density * numel)]
    if kind == "sparse":
        tau[idx] = torch.randn(idx.numel(), generator=generator) * 1e-3
        return get_codec("sparse").encode(tau.view(shape), value_dtype=torch.bfloat16)
    tau[idx] = torch.where(torch.rand(idx.numel(), generator=generator) < 0.5, -1e-3, 1e-3)
    return get_codec("ternary").encode(tau.view(shape))


def matrix_swap_seconds(shape: tuple[int, int], kind: str, parts: dict[str, torch.Tensor], mode: str,
                        device: str, repeat: int) -> float:
    """Best time of one matrix's swap: restore from a random bf16 base, then add 0.7 x the expert
    (``add_into``: decode-and-add from ``parts``; ``cached``: from an already-decoded fp32 delta)."""
    codec = get_codec(kind)
    base = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_()
    weight = torch.empty_like(base)
    if mode == "add_into":
        def swap():
            weight.copy_(base)
            codec.add_into(weight, parts, 0.7)
    else:   # what server.worker does with a host-cache hit: fp32 delta already decoded
        delta = codec.decode(parts, shape, torch.float32)

        def swap():
            weight.copy_((base.float() + 0.7 * delta).to(base.dtype))
    return best_seconds(swap, device, repeat)


def swap_row(kind: str, parts_by_name: dict[str, dict[str, torch.Tensor]], args: argparse.Namespace,
             copy_gbs: float) -> dict:
    """Time the swap of every matrix of ``args.layers`` layers with the ``kind`` expert; one table row."""
    total_s, total_bytes, expert_bytes, params = 0.0, 0, 0, 0
    for _layer in range(args.layers):
        for name, shape in LAYER_SHAPES:
            parts = parts_by_name[name]
            total_s += matrix_swap_seconds(shape, kind, parts, args.mode, args.device, args.repeat)
            w_bytes = shape[0] * shape[1] * 2   # bf16
            e_bytes = sum(p.numel() * p.element_size() for p in parts.values())
            total_bytes += 4 * w_bytes + e_bytes
            expert_bytes += e_bytes
            params += shape[0] * shape[1]
    gbs = total_bytes / total_s / 1e9
    return {"codec": kind, "mode": args.mode, "layers": args.layers, "params": params, "weight_gib": params * 2 / 2**30,
            "expert_mib": expert_bytes / 2**20, "bits_per_param": 8 * expert_bytes / params,
            "swap_seconds": total_s, "gb_per_s": gbs, "copy_gb_per_s": copy_gbs, "vs_copy": gbs / copy_gbs}


def print_table(rows: list[dict], device: str, name: str, copy_gbs: float, mode: str) -> None:
    print(f"device {device} ({name}); copy bandwidth {copy_gbs:.1f} GB/s (read+write)")
    print(f"mode {mode}")
    print("| codec | layers | params | expert MiB | bits/param | swap s | GB/s | vs copy |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['codec']} | {r['layers']} | {r['params'] / 1e9:.2f} B | {r['expert_mib']:.0f} | "
              f"{r['bits_per_param']:.2f} | {r['swap_seconds']:.3f} | {r['gb_per_s']:.1f} | {r['vs_copy']:.2f} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=32, help="transformer layers to time (32 = the whole 7B)")
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--mode", choices=["add_into", "cached"], default="add_into",
                    help="add_into: restore + decode-and-add from the encoded expert (a host-cache miss); "
                         "cached: base + w * an already-decoded fp32 delta (a host-cache hit)")
    ap.add_argument("--out", type=Path)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    gen = torch.Generator().manual_seed(0)
    # One layer's experts are encoded once and reused for every layer (same shapes, same work).
    experts = {kind: {name: {k: v.to(device) for k, v in encode_expert(shape, args.density, kind, gen).items()}
                      for name, shape in LAYER_SHAPES} for kind in ("sparse", "ternary")}
    copy_gbs = copy_bandwidth(2 * HIDDEN * INTER * 2, device, args.repeat)
    rows = [swap_row(kind, parts_by_name, args, copy_gbs) for kind, parts_by_name in experts.items()]
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or platform.machine()
    print_table(rows, device, name, copy_gbs, args.mode)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**provenance(argv=argv), "device": device, "device_name": name,
                                        "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
