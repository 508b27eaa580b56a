"""The vLLM-CPU LoRA fix: adapter-less rows (slot -1) get no adapter, other rows are unchanged."""

import torch

from deltaserve.server.vllm_patches import patch_cpu_lora_ops


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


def _reference(inputs, weights, indices):
    """Row by row: ``inputs[i] @ W[slot_i]^T`` (W = [slots, 1, out, in]), 0 for slot -1."""
    return torch.stack([torch.zeros(weights.shape[2]) if s < 0 else weights[s, 0] @ inputs[i]
                        for i, s in enumerate(indices.tolist())])


def test_grouped_ops_equal_the_per_row_definition():
    """The grouped shrink / expand / expand-slice (one matmul per slot present) give each row its own slot's
    product, nothing for slot -1, whether every row shares a slot or not; add_inputs by keyword too."""
    patch_cpu_lora_ops()
    from vllm.lora.punica_wrapper import punica_cpu

    gen = torch.Generator().manual_seed(1)
    a = torch.randn(3, 1, 4, 16, generator=gen)            # shrink: 3 slots, rank 4, in 16
    b = torch.randn(3, 1, 12, 4, generator=gen)            # expand: out 12
    for indices in (torch.tensor([2, -1, 0, 2, -1, 1]), torch.full((6,), 1), torch.full((6,), -1)):
        x = torch.randn(6, 16, generator=gen)
        out = torch.full((6, 4), 7.0)
        punica_cpu.bgmv_shrink(x, a, out, indices, 0.5)
        torch.testing.assert_close(out, 0.5 * _reference(x, a, indices))
        h = torch.randn(6, 4, generator=gen)
        y0 = torch.randn(6, 20, generator=gen)
        y = y0.clone()
        punica_cpu.bgmv_expand_slice(h, b, y, indices, 5, 12, True)
        torch.testing.assert_close(y[:, 5:17], y0[:, 5:17] + _reference(h, b, indices))
        assert torch.equal(y[:, :5], y0[:, :5]) and torch.equal(y[:, 17:], y0[:, 17:])
        y = y0[:, :12].clone()
        punica_cpu.bgmv_expand(h, b, y, indices, add_inputs=False)
        torch.testing.assert_close(y, _reference(h, b, indices))


def test_prefill_ops_expand_each_sequences_slot_to_its_tokens():
    """sgmv_* (vLLM-CPU's path for every step): sequence slots [1, -1, 0] over lengths [3, 2, 1] give the
    tokens' slots; the expand assigns unless add_inputs is passed (vLLM's default for sgmv)."""
    patch_cpu_lora_ops()
    from vllm.lora.ops.torch_ops import lora_ops

    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 1, 4, 16, generator=gen), torch.randn(2, 1, 12, 4, generator=gen)
    lens, slots = torch.tensor([3, 2, 1]), torch.tensor([1, -1, 0])
    tokens = torch.tensor([1, 1, 1, -1, -1, 0])
    x, h = torch.randn(6, 16, generator=gen), torch.randn(6, 4, generator=gen)
    for _ in range(2):   # the second call reuses the step's token slots
        out = torch.full((6, 4), 7.0)
        lora_ops.sgmv_shrink(x, a, out, None, lens, slots, 3, 3, 6, 2.0)
        torch.testing.assert_close(out, 2.0 * _reference(x, a, tokens))
        y = torch.full((6, 12), 7.0)
        lora_ops.sgmv_expand(h, b, y, None, lens, slots, 3, 3, 6)
        torch.testing.assert_close(y, _reference(h, b, tokens))
        y = torch.full((6, 14), 7.0)
        lora_ops.sgmv_expand_slice(h, b, y, None, lens, slots, 3, 3, 6, 1, 12, True)
        torch.testing.assert_close(y[:, 1:13], 7.0 + _reference(h, b, tokens))


def _linear_reference(x, a_stacked, b_stacked, scale, slices, indices):
    """Row by row, slice by slice: ``scale * x_i @ A_s[slot]^T @ B_s[slot]^T``, 0 for slot -1."""
    parts = [scale * _reference(_reference(x, a, indices), b[:, :, :out], indices)
             for a, b, out in zip(a_stacked, b_stacked, slices)]
    return torch.cat(parts, dim=1)


def test_the_fused_linear_equals_the_per_row_definition():
    """fused_lora_linear (one slot: its A of every slice in one matmul; several: every slot's A at once and
    a per-step slot mask; then one matmul per slice) gives each row its own slot's product and slot -1 rows
    nothing, for mixed and one-slot batches; a slot rewritten in place (vLLM loading another adapter into
    it) is seen on the next call; slots that do not match the rows are declined."""
    from deltaserve.server.vllm_patches import fused_lora_linear

    gen = torch.Generator().manual_seed(3)
    slices = (12, 5, 5)                                    # a qkv-like linear: three slices
    a = tuple(torch.randn(3, 1, 4, 16, generator=gen) for _ in slices)
    b = tuple(torch.randn(3, 1, out + 2, 4, generator=gen) for out in slices)   # B wider than its slice
    x = torch.randn(7, 16, generator=gen)
    for step in range(3):
        for indices in (torch.tensor([2, -1, 0, 2, -1, 1, 0]), torch.full((7,), 2), torch.full((7,), -1)):
            y0 = torch.randn(7, sum(slices), generator=gen)
            y = y0.clone()
            assert fused_lora_linear(y, x, a, b, 0.5, slices, indices)
            torch.testing.assert_close(y, y0 + _linear_reference(x, a, b, 0.5, slices, indices))
            assert all(torch.equal(y[i], y0[i]) for i in range(7) if indices[i] < 0)
        a[1][2, 0].copy_(torch.randn(4, 16, generator=gen))     # a new adapter in slot 2
        b[0][2, 0].mul_(-1.0)
    y = y0.clone()
    assert not fused_lora_linear(y, x, a, b, 1.0, slices, torch.tensor([0, 1, 2])) and torch.equal(y, y0)


def test_the_punica_wrapper_runs_each_linear_through_the_fused_op_with_the_steps_state(monkeypatch):
    """update_metadata (once per step, when vLLM's LoRA mapping changes) records the tokens' slots and their
    groups; add_lora_linear hands them to fused_lora_linear, and runs vLLM's own path if it declines."""
    patch_cpu_lora_ops()
    from vllm.lora.punica_wrapper import punica_cpu

    from deltaserve.server import vllm_patches

    from vllm.lora.layers import LoRAMapping

    wrapper = punica_cpu.PunicaWrapperCPU(16, 4, "cpu")
    for is_prefill in (True, False):   # LoRA ids 1 and 2 in slots 0 and 1; id 0 is no adapter
        wrapper.update_metadata(LoRAMapping(index_mapping=(1, 0, 2), prompt_mapping=(1, 0, 2), is_prefill=is_prefill),
                                [1, 2], 2, 100)
    slots = torch.tensor([0, -1, 1])
    gen = torch.Generator().manual_seed(4)
    a, b = (torch.randn(2, 1, 4, 16, generator=gen),), (torch.randn(2, 1, 6, 4, generator=gen),)
    x = torch.randn(3, 16, generator=gen)
    y = torch.zeros(3, 6)
    wrapper.add_lora_linear(y, x, a, b, 1.0, (6,))   # fused
    torch.testing.assert_close(y, _linear_reference(x, a, b, 1.0, (6,), slots))
    calls = []
    monkeypatch.setattr(vllm_patches, "fused_lora_linear", lambda *args: calls.append(args) or False)
    y = torch.zeros(3, 6)
    wrapper.add_lora_linear(y, x, a, b, 1.0, (6,))   # declined: vLLM's path (the grouped ops) runs
    assert len(calls) == 1 and torch.equal(calls[0][6], slots) and [g for g, _ in calls[0][7]] == [-1, 0, 1]
    torch.testing.assert_close(y, _linear_reference(x, a, b, 1.0, (6,), slots))


def test_shapes_the_grouped_ops_do_not_cover_fall_back_to_vllms_op_with_the_minus_one_fix():
    """One input row against three slots (indices and rows differ, neither broadcast): vLLM's op runs
    (its einsum broadcasts the row), and the slot -1 row still gets nothing."""
    patch_cpu_lora_ops()
    from vllm.lora.punica_wrapper import punica_cpu

    gen = torch.Generator().manual_seed(5)
    weights = torch.randn(2, 1, 4, 16, generator=gen)
    x = torch.randn(1, 16, generator=gen)
    out = torch.full((3, 4), 7.0)
    punica_cpu.bgmv_shrink(x, weights, out, torch.tensor([0, -1, 1]), 2.0)
    torch.testing.assert_close(out, torch.stack([2.0 * weights[0, 0] @ x[0], torch.zeros(4), 2.0 * weights[1, 0] @ x[0]]))


def test_the_fused_linear_runs_bf16_adapters_and_outputs_in_float32():
    """A bf16 model's LoRA slots and outputs: the product is taken in float32 (vLLM's buffers' dtype) and
    added to the bf16 output."""
    from deltaserve.server.vllm_patches import fused_lora_linear

    gen = torch.Generator().manual_seed(6)
    a = (torch.randn(2, 1, 4, 16, generator=gen).bfloat16(),)
    b = (torch.randn(2, 1, 6, 4, generator=gen).bfloat16(),)
    x = torch.randn(3, 16, generator=gen).bfloat16()
    for indices in (torch.tensor([1, -1, 0]), torch.full((3,), 1)):
        y = torch.zeros(3, 6, dtype=torch.bfloat16)
        assert fused_lora_linear(y, x, a, b, 1.0, (6,), indices)
        expected = _linear_reference(x.float(), (a[0].float(),), (b[0].float(),), 1.0, (6,), indices)
        torch.testing.assert_close(y.float(), expected, atol=0.05, rtol=0.02)
