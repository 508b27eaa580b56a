"""vLLM-CPU LoRA patches: slot -1 rows get no adapter, other rows are unchanged; they apply only on a tested vLLM
on CPU, target by target where the signature is the recorded one; the fixture puts vLLM's methods back."""

import dataclasses
import logging

import pytest
import torch
from vllm.lora.layers import LoRAMapping
from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from deltaserve.server import lora_ops, vllm_compat, vllm_patches
from deltaserve.server.lora_ops import PackedWeights, fused_lora_linear, grouped_shrink, no_lora_rows, row_groups
from deltaserve.server.punica_methods import state_of
from deltaserve.server.vllm_patches import (PATCHES, apply_vllm_patches, patched_targets, replaced_by,
                                            unsupported_reason, vllm_patches_applied)

NAMES = [patch.name for patch in PATCHES]


@pytest.fixture
def vllm_methods(monkeypatch):
    """vLLM's own methods for one test, whatever this process applied before (the worker extension applies
    the patches where it is imported); the process's methods again afterwards."""
    for name in NAMES:
        vllm_method = replaced_by(PunicaWrapperCPU.__dict__.get(name))
        if vllm_method is not None and vllm_method is PunicaWrapperBase.__dict__.get(name):
            monkeypatch.delattr(PunicaWrapperCPU, name)     # inherited (update_metadata)
        elif vllm_method is not None:
            monkeypatch.setattr(PunicaWrapperCPU, name, vllm_method)


@pytest.fixture
def patched(vllm_methods):
    """The patches for one test, applied to vLLM's methods and taken off afterwards."""
    with vllm_patches_applied() as applied:
        yield applied


def _wrapper(slots: list[int], prefill: bool = False, n_slots: int = 3) -> PunicaWrapperCPU:
    """A CPU punica wrapper whose step gives token i slot ``slots[i]`` (slot s holds LoRA id s + 1; id 0 is
    no adapter, slot -1)."""
    wrapper = PunicaWrapperCPU(64, 8, "cpu")
    ids = tuple(slot + 1 for slot in slots)
    wrapper.update_metadata(LoRAMapping(index_mapping=ids, prompt_mapping=ids, is_prefill=prefill),
                            list(range(1, n_slots + 1)), n_slots, 100)
    return wrapper


def _reference(inputs, weights, indices):
    """Row by row: ``inputs[i] @ W[slot_i]^T`` (W = [slots, 1, out, in]), 0 for slot -1."""
    return torch.stack([torch.zeros(weights.shape[2]) if s < 0 else weights[s, 0] @ inputs[i]
                        for i, s in enumerate(indices.tolist())])


def test_the_patches_are_in_place_inside_the_fixture_and_gone_after_it(vllm_methods):
    """Inside: every target replaced. After: vLLM's own methods (update_metadata inherited again), and vLLM's
    op gives an adapter-less row the last slot's adapter — the bug the patches exist for."""
    originals = {name: PunicaWrapperCPU.__dict__.get(name) for name in NAMES}
    found = {name: getattr(PunicaWrapperCPU, name) for name in NAMES}
    with vllm_patches_applied() as applied:
        assert applied == patched_targets() == [patch.target for patch in PATCHES]
        assert {name: replaced_by(PunicaWrapperCPU.__dict__[name]) for name in NAMES} == found
    assert {name: PunicaWrapperCPU.__dict__.get(name) for name in NAMES} == originals
    assert originals["update_metadata"] is None and patched_targets() == []
    weights, x, out = torch.randn(2, 1, 4, 16), torch.randn(3, 16), torch.zeros(3, 4)
    _wrapper([0, -1, 1], n_slots=2)._shrink_decode(out, x, weights, 1.0)
    torch.testing.assert_close(out[1], weights[1, 0] @ x[1])


def test_applying_twice_patches_nothing_the_second_time(patched):
    methods = {name: PunicaWrapperCPU.__dict__[name] for name in NAMES}
    assert apply_vllm_patches() == []
    assert {name: PunicaWrapperCPU.__dict__[name] for name in NAMES} == methods
    assert patched_targets() == [patch.target for patch in PATCHES]


def test_a_changed_vllm_signature_keeps_vllms_method_with_a_warning(vllm_methods, monkeypatch, caplog):
    """A method whose parameters differ from the recorded ones (vLLM changed it, or the record says another
    signature) stays vLLM's object, with a warning naming the target and the difference; the others patch."""
    def shrink_decode(self, y, x, w_t_all, scale, lora_ids):
        return None
    vllm_expand = PunicaWrapperCPU.__dict__["_expand_decode"]
    monkeypatch.setattr(PunicaWrapperCPU, "_shrink_decode", shrink_decode)
    monkeypatch.setattr(vllm_patches, "PATCHES", tuple(
        dataclasses.replace(p, parameters=("self", "y", "x", "w_t_all", "add_inputs=True"))
        if p.name == "_expand_decode" else p for p in PATCHES))
    with caplog.at_level(logging.WARNING, logger=vllm_patches.__name__), vllm_patches_applied() as applied:
        assert PunicaWrapperCPU.__dict__["_shrink_decode"] is shrink_decode
        assert PunicaWrapperCPU.__dict__["_expand_decode"] is vllm_expand
        assert not any(target.endswith(("._shrink_decode", "._expand_decode")) for target in applied)
        assert replaced_by(PunicaWrapperCPU.__dict__["_shrink_prefill"]) is not None
    warnings = [r.getMessage() for r in caplog.records
                if r.name == vllm_patches.__name__ and r.levelno == logging.WARNING]
    assert any("PunicaWrapperCPU._shrink_decode" in w and "new lora_ids" in w for w in warnings), warnings
    assert any("PunicaWrapperCPU._expand_decode" in w and "missing add_inputs=True" in w and "new add_inputs" in w
               for w in warnings), warnings


@pytest.mark.parametrize("setting", ["gpu", "untested version"])
def test_nothing_is_patched_off_cpu_or_on_an_untested_vllm(setting, vllm_methods, monkeypatch, caplog):
    from vllm.platforms import current_platform

    if setting == "gpu":
        monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    else:
        monkeypatch.setattr(vllm_compat, "VERSION", "0.33.0")
    methods = {name: PunicaWrapperCPU.__dict__.get(name) for name in NAMES}
    with caplog.at_level(logging.INFO, logger=vllm_patches.__name__):
        assert apply_vllm_patches() == []
    assert {name: PunicaWrapperCPU.__dict__.get(name) for name in NAMES} == methods and patched_targets() == []
    why = "not CPU" if setting == "gpu" else "vLLM 0.33.0 is not a tested version (0.32.0)"
    records = [r for r in caplog.records if r.name == vllm_patches.__name__]
    assert [r.levelno for r in records] == [logging.INFO] and why in records[0].getMessage()


def test_a_tested_release_with_a_local_or_post_label_counts_as_tested(monkeypatch):
    for version in ("0.32.0", "0.32.0+cpu", "0.32.0.post1"):
        monkeypatch.setattr(vllm_compat, "VERSION", version)
        assert unsupported_reason() is None
    monkeypatch.setattr(vllm_compat, "VERSION", "0.32.1")
    assert "0.32.1" in unsupported_reason()


def test_shrink_keeps_slot_minus_one_rows_adapter_less(patched):
    """Every slot full (3 of 3): decode (token slots) and prefill (per-sequence slots) give slot -1 rows 0."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=gen)
    weights = torch.randn(3, 1, 4, 16, generator=gen)      # 3 slots, rank 4
    indices = torch.tensor([0, -1, 2, -1, 1])
    for prefill in (False, True):
        out = torch.full((5, 4), 7.0)
        wrapper = _wrapper(indices.tolist(), prefill)
        (wrapper._shrink_prefill if prefill else wrapper._shrink_decode)(out, x, weights, 0.5)
        torch.testing.assert_close(out, 0.5 * _reference(x, weights, indices))
    out = torch.full((10, 4), 7.0)
    _wrapper([-1] * 4 + [1] * 6, prefill=True)._shrink_prefill(out, torch.randn(10, 16), weights, 1.0)
    assert torch.count_nonzero(out[:4]) == 0 and torch.count_nonzero(out[4:]) > 0


def test_a_single_broadcast_index_is_handled():
    weights = torch.randn(2, 1, 4, 16)
    for slot, zero in ((-1, True), (1, False)):
        out = torch.full((6, 4), 7.0)
        assert grouped_shrink(torch.randn(6, 16), weights, out, row_groups(torch.tensor([slot]), 6), 1.0)
        assert bool((out == 0).all()) is zero
        assert (no_lora_rows(torch.tensor([slot]), 6) is None) is not zero


def test_grouped_ops_equal_the_per_row_definition(patched):
    """The decode shrink / expand / expand-slice (one matmul per slot present) give each row its own slot's
    product, nothing for slot -1, whether every row shares a slot or not."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(3, 1, 4, 16, generator=gen)            # shrink: 3 slots, rank 4, in 16
    b = torch.randn(3, 1, 12, 4, generator=gen)            # expand: out 12
    for indices in (torch.tensor([2, -1, 0, 2, -1, 1]), torch.full((6,), 1), torch.full((6,), -1)):
        wrapper = _wrapper(indices.tolist())
        x = torch.randn(6, 16, generator=gen)
        out = torch.full((6, 4), 7.0)
        wrapper._shrink_decode(out, x, a, 0.5)
        torch.testing.assert_close(out, 0.5 * _reference(x, a, indices))
        h, y0 = torch.randn(6, 4, generator=gen), torch.randn(6, 20, generator=gen)
        y = y0.clone()
        wrapper._expand_slice_decode(y, h, b, 5, 12, True)
        torch.testing.assert_close(y[:, 5:17], y0[:, 5:17] + _reference(h, b, indices))
        assert torch.equal(y[:, :5], y0[:, :5]) and torch.equal(y[:, 17:], y0[:, 17:])
        y = y0[:, :12].clone()
        wrapper._expand_decode(y, h, b, False)
        torch.testing.assert_close(y, _reference(h, b, indices))


def test_prefill_ops_expand_each_sequences_slot_to_its_tokens(patched):
    """The prefill (sgmv) path: sequence slots [1, -1, 0] over lengths [3, 2, 1] give the tokens' slots,
    expanded once per step (the second call reuses them)."""
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 1, 4, 16, generator=gen), torch.randn(2, 1, 12, 4, generator=gen)
    tokens = torch.tensor([1, 1, 1, -1, -1, 0])
    wrapper = _wrapper(tokens.tolist(), prefill=True, n_slots=2)
    assert wrapper.prefill_metadata[2].tolist() == [1, -1, 0] and wrapper.prefill_metadata[1].tolist() == [3, 2, 1]
    x, h = torch.randn(6, 16, generator=gen), torch.randn(6, 4, generator=gen)
    exploded = []
    for _ in range(2):
        out = torch.full((6, 4), 7.0)
        wrapper._shrink_prefill(out, x, a, 2.0)
        torch.testing.assert_close(out, 2.0 * _reference(x, a, tokens))
        _, lengths, sequence_slots, *_ = wrapper.prefill_metadata
        exploded.append(state_of(wrapper).groups.tokens(sequence_slots, lengths))
        y = torch.full((6, 12), 7.0)
        wrapper._expand_prefill(y, h, b, False)
        torch.testing.assert_close(y, _reference(h, b, tokens))
        y = torch.full((6, 14), 7.0)
        wrapper._expand_slice_prefill(y, h, b, 1, 12, True)
        torch.testing.assert_close(y[:, 1:13], 7.0 + _reference(h, b, tokens))
    assert exploded[0] is exploded[1] and torch.equal(exploded[0], tokens)


def _linear_reference(x, a_stacked, b_stacked, scale, slices, indices):
    """Row by row, slice by slice: ``scale * x_i @ A_s[slot]^T @ B_s[slot]^T``, 0 for slot -1."""
    parts = [scale * _reference(_reference(x, a, indices), b[:, :, :out], indices)
             for a, b, out in zip(a_stacked, b_stacked, slices)]
    return torch.cat(parts, dim=1)


def test_the_fused_linear_equals_the_per_row_definition():
    """fused_lora_linear (one slot: its A of every slice in one matmul; several: every slot's A at once and
    a slot mask; then one matmul per slice) gives each row its own slot's product and slot -1 rows nothing,
    for mixed and one-slot batches; a slot rewritten in place (vLLM loading another adapter into it) is seen
    on the next call through a kept PackedWeights; slots that do not match the rows are declined."""
    gen = torch.Generator().manual_seed(3)
    slices = (12, 5, 5)                                    # a qkv-like linear: three slices
    a = tuple(torch.randn(3, 1, 4, 16, generator=gen) for _ in slices)
    b = tuple(torch.randn(3, 1, out + 2, 4, generator=gen) for out in slices)   # B wider than its slice
    x = torch.randn(7, 16, generator=gen)
    packed = PackedWeights()
    for _ in range(3):
        for indices in (torch.tensor([2, -1, 0, 2, -1, 1, 0]), torch.full((7,), 2), torch.full((7,), -1)):
            for cache in (packed, None):
                y0 = torch.randn(7, sum(slices), generator=gen)
                y = y0.clone()
                assert fused_lora_linear(y, x, a, b, 0.5, slices, indices, packed=cache)
                torch.testing.assert_close(y, y0 + _linear_reference(x, a, b, 0.5, slices, indices))
                assert all(torch.equal(y[i], y0[i]) for i in range(7) if indices[i] < 0)
        a[1][2, 0].copy_(torch.randn(4, 16, generator=gen))     # a new adapter in slot 2
        b[0][2, 0].mul_(-1.0)
    assert len(packed) == 2                                     # this linear: slot 2 alone, and every slot
    y = y0.clone()
    assert not fused_lora_linear(y, x, a, b, 1.0, slices, torch.tensor([0, 1, 2])) and torch.equal(y, y0)


def test_the_punica_wrapper_runs_each_linear_through_the_fused_op_with_its_own_state(patched, monkeypatch):
    """update_metadata (once per step) records the tokens' slots and their groups on the wrapper;
    add_lora_linear hands them and the wrapper's packed weights to fused_lora_linear, and runs vLLM's own
    path (the patched shrink and expand) if it declines. Another wrapper's state is its own."""
    wrapper, other = _wrapper([0, -1, 1], n_slots=2), _wrapper([1, 1, 1], n_slots=2)
    slots = torch.tensor([0, -1, 1])
    gen = torch.Generator().manual_seed(4)
    a, b = (torch.randn(2, 1, 4, 16, generator=gen),), (torch.randn(2, 1, 6, 4, generator=gen),)
    x = torch.randn(3, 16, generator=gen)
    y = torch.zeros(3, 6)
    wrapper.add_lora_linear(y, x, a, b, 1.0, (6,))   # fused
    torch.testing.assert_close(y, _linear_reference(x, a, b, 1.0, (6,), slots))
    assert len(state_of(wrapper).packed) == 1 and len(state_of(other).packed) == 0
    assert torch.equal(state_of(other).step[0], torch.tensor([1, 1, 1]))
    calls = []
    monkeypatch.setattr(lora_ops, "fused_lora_linear", lambda *args, **kwargs: calls.append((args, kwargs)) and False)
    y = torch.zeros(3, 6)
    wrapper.add_lora_linear(y, x, a, b, 1.0, (6,))   # declined: vLLM's path runs
    (args, kwargs), = calls
    assert torch.equal(args[6], slots) and [g for g, _ in args[7]] == [-1, 0, 1]
    assert kwargs["packed"] is state_of(wrapper).packed
    torch.testing.assert_close(y, _linear_reference(x, a, b, 1.0, (6,), slots))


def test_shapes_the_grouped_ops_do_not_cover_fall_back_to_vllms_op_with_the_minus_one_fix(patched):
    """One input row against three slots (rows and slots differ, neither broadcast): vLLM's op runs (its
    einsum broadcasts the row), and the slot -1 row still gets nothing though every slot is full."""
    gen = torch.Generator().manual_seed(5)
    weights = torch.randn(2, 1, 4, 16, generator=gen)
    x = torch.randn(1, 16, generator=gen)
    out = torch.full((3, 4), 7.0)
    _wrapper([0, -1, 1], n_slots=2)._shrink_decode(out, x, weights, 2.0)
    expected = torch.stack([2.0 * weights[0, 0] @ x[0], torch.zeros(4), 2.0 * weights[1, 0] @ x[0]])
    torch.testing.assert_close(out, expected)


def test_lm_head_lora_logits_leave_adapter_less_rows_alone(patched):
    """add_lora_logits (an lm_head LoRA, by sampled row): slot -1 rows keep the base logits."""
    gen = torch.Generator().manual_seed(7)
    a, b = torch.randn(2, 1, 4, 16, generator=gen), torch.randn(2, 1, 30, 4, generator=gen)
    x, y0 = torch.randn(3, 16, generator=gen), torch.randn(3, 30, generator=gen)
    slots = torch.tensor([1, -1, 0])
    y = y0.clone()
    _wrapper(slots.tolist(), n_slots=2).add_lora_logits(y, x, a, b, 0.5)
    torch.testing.assert_close(y, y0 + _reference(0.5 * _reference(x, a, slots), b, slots))
    assert torch.equal(y[1], y0[1])


def test_vllms_full_linear_already_keeps_adapter_less_rows_base(patched):
    """apply_lora_full_linear is left to vLLM: it selects the base output for slot -1 rows itself."""
    gen = torch.Generator().manual_seed(8)
    weights, bias = torch.randn(2, 1, 6, 16, generator=gen), torch.randn(2, 6, generator=gen)
    x, y0 = torch.randn(3, 16, generator=gen), torch.randn(3, 6, generator=gen)
    y = y0.clone()
    _wrapper([1, -1, 0], n_slots=2).apply_lora_full_linear(y, x, weights, bias, torch.tensor([True, True]))
    assert torch.equal(y[1], y0[1]) and not torch.equal(y[0], y0[0])


def test_the_fused_linear_runs_bf16_adapters_and_outputs_in_float32():
    """A bf16 model's LoRA slots and outputs: the product is taken in float32 (vLLM's buffers' dtype) and
    added to the bf16 output."""
    gen = torch.Generator().manual_seed(6)
    a = (torch.randn(2, 1, 4, 16, generator=gen).bfloat16(),)
    b = (torch.randn(2, 1, 6, 4, generator=gen).bfloat16(),)
    x = torch.randn(3, 16, generator=gen).bfloat16()
    for indices in (torch.tensor([1, -1, 0]), torch.full((3,), 1)):
        y = torch.zeros(3, 6, dtype=torch.bfloat16)
        assert fused_lora_linear(y, x, a, b, 1.0, (6,), indices)
        expected = _linear_reference(x.float(), (a[0].float(),), (b[0].float(),), 1.0, (6,), indices)
        torch.testing.assert_close(y.float(), expected, atol=0.05, rtol=0.02)
