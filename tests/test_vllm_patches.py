"""The vLLM-CPU LoRA fix: adapter-less rows (slot -1) get no adapter, other rows are unchanged."""

import torch

from server.vllm_patches import patch_cpu_lora_ops


def test_shrink_keeps_slot_minus_one_rows_adapter_less():
    patch_cpu_lora_ops()
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(5, 16, generator=gen)
    weights = torch.randn(3, 1, 4, 16, generator=gen)      # 3 slots, rank 4
    indices = torch.tensor([0, -1, 2, -1, 1])
    for shrink in (punica_cpu.bgmv_shrink, lora_ops.bgmv_shrink):
        out = torch.full((5, 4), 7.0)
        shrink(inputs, weights, out, indices, 0.5)
        for row, slot in enumerate(indices.tolist()):
            expected = torch.zeros(4) if slot < 0 else 0.5 * weights[slot, 0] @ inputs[row]
            torch.testing.assert_close(out[row], expected)
    out = torch.zeros(10, 4)     # prefill: sgmv_shrink explodes per-sequence slots to tokens
    lora_ops.sgmv_shrink(torch.randn(10, 16), weights, out, None, torch.tensor([4, 6]), torch.tensor([-1, 1]),
                         2, 6, 10, 1.0)
    assert torch.count_nonzero(out[:4]) == 0 and torch.count_nonzero(out[4:]) > 0


def test_a_single_broadcast_index_is_handled():
    patch_cpu_lora_ops()
    from vllm.lora.punica_wrapper import punica_cpu

    weights = torch.randn(2, 1, 4, 16)
    for slot, zero in ((-1, True), (1, False)):
        out = torch.full((6, 4), 7.0)
        punica_cpu.bgmv_shrink(torch.randn(6, 16), weights, out, torch.tensor([slot]), 1.0)
        assert bool((out == 0).all()) is zero


def test_patch_is_applied_once():
    patch_cpu_lora_ops()
    assert patch_cpu_lora_ops() is False
