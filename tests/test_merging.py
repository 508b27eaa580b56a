"""experts.merge: registry, invariants, and mergekit / PEFT as oracles (seeded, tiny)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from mergekit.merge_methods import merge_tensors

from deltaserve.experts.merge import MERGE_METHODS, get_merge_method, merge_method
from deltaserve.experts.merge.lora import lora_concat
from deltaserve.experts.sparsify import magnitude
from oracles import DTYPES, RTOL, SHAPE, assert_rel, make_tau, peft_mu  # noqa: F401

# The registry and every method by name, as one namespace (each method lives in its own module).
mg = SimpleNamespace(MERGE_METHODS=MERGE_METHODS, get_merge_method=get_merge_method, merge_method=merge_method,
                     **{name: MERGE_METHODS[name] for name in MERGE_METHODS})

WEIGHTS = [0.5, 1.3, 0.8]
UNIT = [1.0, 1.0, 1.0]


def make_deltas(dtype: torch.dtype, count: int = 3) -> list[torch.Tensor]:
    return [make_tau(dtype, seed=10 + i) for i in range(count)]


def mergekit_delta(method: str, deltas, weights, **parameters) -> torch.Tensor:
    """mergekit's merged delta: base = 0, so the fine-tuned inputs are the deltas exactly."""
    base = torch.zeros_like(deltas[0])
    parameters = {"weight": list(weights), **parameters}
    return merge_tensors([base, *deltas], method, parameters=parameters, base_index=0)


def peft_masks(deltas, density: float, seed: int) -> list[torch.Tensor]:
    """The keep-masks PEFT's random_pruning draws after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return [torch.bernoulli(torch.full_like(d, density)).bool() for d in deltas]


def plain_sum(deltas, weights) -> torch.Tensor:
    return sum(w * d for w, d in zip(weights, deltas))


# ------------------------------------------------------------------------- registry


def test_registry_holds_every_method():
    expected = {"task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties"}
    expected.add("pcb")
    assert set(mg.MERGE_METHODS) == expected
    assert mg.get_merge_method("ties") is mg.ties


def test_registry_miss_lists_known_names():
    with pytest.raises(ValueError, match="unknown merge method 'nope'") as info:
        mg.get_merge_method("nope")
    assert all(name in str(info.value) for name in mg.MERGE_METHODS)


def test_duplicate_and_malformed_registrations_are_rejected():
    before = dict(mg.MERGE_METHODS)
    with pytest.raises(ValueError, match="already registered"):
        mg.merge_method("ties")(lambda deltas, weights: deltas[0])
    with pytest.raises(ValueError, match=r"\(deltas, weights"):
        mg.merge_method("broken")(lambda tensors, *, density=0.5: tensors[0])
    assert mg.MERGE_METHODS == before


@pytest.mark.parametrize(
    ("method", "options", "name"),
    [
        ("ties", {"densty": 0.5}, "densty"),
        ("task_arithmetic", {"density": 0.5}, "density"),
        ("ties", {"density": 0.0}, "density"),
        ("ties", {"density": 1.5}, "density"),
        ("ties", {"sign_method": "max"}, "sign_method"),
        ("ties", {"sign_source": "both"}, "sign_source"),
        ("dare_ties", {"normalize": True, "generator": torch.Generator()}, "normalize"),
        ("dare_linear", {"generator": torch.Generator(), "masks": []}, "generator or masks"),
        ("dare_linear", {"masks": [torch.ones(SHAPE, dtype=torch.bool)]}, "masks"),
        ("dare_linear", {"generator": torch.Generator(), "rescale": 1}, "rescale"),
        ("breadcrumbs", {"gamma": 1.0}, "gamma"),
        ("breadcrumbs_ties", {"gamma": -0.5}, "gamma"),
        ("pcb", {"ratio": 0.0}, "ratio"),
    ],
)
def test_bad_options_name_the_option(method, options, name):
    with pytest.raises(ValueError, match=name):
        mg.get_merge_method(method)(make_deltas(torch.float32), WEIGHTS, **options)


def test_bad_inputs_name_the_parameter():
    deltas = make_deltas(torch.float32)
    with pytest.raises(ValueError, match="weights"):
        mg.task_arithmetic(deltas, [1.0, 2.0])
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        mg.task_arithmetic(deltas, [1.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match=r"deltas\[1\]"):
        mg.task_arithmetic([deltas[0], deltas[1][:2]], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"deltas\[2\]"):
        mg.task_arithmetic([deltas[0], deltas[1], deltas[2].double()], WEIGHTS)
    with pytest.raises(ValueError, match="deltas"):
        mg.task_arithmetic([], [])


# ----------------------------------------------------------------- task arithmetic


@pytest.mark.parametrize("dtype", DTYPES)
def test_task_arithmetic_matches_mergekit_and_peft(dtype):
    deltas = make_deltas(dtype)
    ours = mg.task_arithmetic(deltas, WEIGHTS)
    assert_rel(ours, mergekit_delta("task_arithmetic", deltas, WEIGHTS), dtype)
    assert_rel(ours, peft_mu.task_arithmetic(deltas, torch.tensor(WEIGHTS, dtype=dtype)), dtype)
    assert not torch.equal(ours, deltas[0])


# ---------------------------------------------------------------------------- TIES


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_matches_mergekit(dtype):
    deltas = make_deltas(dtype)
    ours = mg.ties(deltas, WEIGHTS, density=0.3)
    assert_rel(ours, mergekit_delta("ties", deltas, WEIGHTS, density=0.3), dtype)
    unnormalized = mg.ties(deltas, WEIGHTS, density=0.3, normalize="none")
    assert_rel(unnormalized, mergekit_delta("ties", deltas, WEIGHTS, density=0.3, normalize=False), dtype)
    assert not torch.allclose(ours, unnormalized)
    assert not torch.allclose(ours, plain_sum(deltas, WEIGHTS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_ties_matches_peft(dtype, sign_method):
    deltas = make_deltas(dtype)
    theirs = peft_mu.ties(deltas, torch.tensor(WEIGHTS, dtype=dtype), 0.3, majority_sign_method=sign_method)
    peft_style = dict(sign_source="unweighted", normalize="count")
    ours = mg.ties(deltas, WEIGHTS, density=0.3, sign_method=sign_method, **peft_style)
    assert_rel(ours, theirs, dtype)
    # The mergekit-style default differs from PEFT once weights are not all 1 ...
    assert not torch.allclose(mg.ties(deltas, WEIGHTS, density=0.3, sign_method=sign_method), theirs)
    # ... and all three agree with unit weights.
    unit = mg.ties(deltas, UNIT, density=0.3, sign_method=sign_method)
    theirs_unit = peft_mu.ties(deltas, torch.ones(3, dtype=dtype), 0.3, majority_sign_method=sign_method)
    assert_rel(unit, theirs_unit, dtype)
    if sign_method == "total":
        assert_rel(unit, mergekit_delta("ties", deltas, UNIT, density=0.3), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_disjoint_mean_invariants(dtype):
    deltas = make_deltas(dtype)
    merged = mg.ties(deltas, UNIT, density=0.3)
    trimmed = torch.stack([magnitude(d, 0.3) for d in deltas])
    elected = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0).to(dtype)
    agree = torch.sign(trimmed) == elected
    assert torch.equal(merged == 0, ~agree.any(0))  # zero exactly where nobody agrees
    assert torch.equal(torch.sign(merged)[merged != 0], elected[merged != 0])
    expected = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    assert_rel(merged, expected, dtype)


def test_ties_zero_score_elects_plus_like_both_libraries():
    deltas = [torch.tensor([1.0, 2.0]), torch.tensor([-1.0, -3.0])]
    ours = mg.ties(deltas, [1.0, 1.0], density=1.0)
    assert ours.tolist() == [1.0, -3.0]
    with pytest.warns(UserWarning, match="no pruning"):
        assert torch.equal(ours, peft_mu.ties(deltas, torch.ones(2), 1.0))
    assert torch.equal(ours, mergekit_delta("ties", deltas, [1.0, 1.0], density=1.0))


# ---------------------------------------------------------------------------- DARE


def test_dare_linear_generator_matches_peft_float32():
    deltas = make_deltas(torch.float32)
    ours = mg.dare_linear(deltas, WEIGHTS, density=0.3, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(5)
    assert_rel(ours, peft_mu.dare_linear(deltas, torch.tensor(WEIGHTS), 0.3), torch.float32)
    assert not torch.allclose(ours, plain_sum(deltas, WEIGHTS))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dare_matches_peft_with_injected_masks(dtype):
    deltas = make_deltas(dtype)
    masks = peft_masks(deltas, 0.4, seed=9)
    weights = torch.tensor(WEIGHTS, dtype=dtype)
    torch.manual_seed(9)
    theirs = peft_mu.dare_linear(deltas, weights, 0.4)
    assert_rel(mg.dare_linear(deltas, WEIGHTS, density=0.4, masks=masks), theirs, dtype)
    peft_style = dict(sign_source="unweighted", normalize="count")
    for sign_method in ("total", "frequency"):
        ours = mg.dare_ties(deltas, WEIGHTS, density=0.4, masks=masks, sign_method=sign_method, **peft_style)
        torch.manual_seed(9)
        assert_rel(ours, peft_mu.dare_ties(deltas, weights, 0.4, majority_sign_method=sign_method), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dare_matches_mergekit_without_rescale(dtype):
    """mergekit's DARE rescales to the L1 norm, not 1/p; without rescale both are tau * mask.

    mergekit's CPU ``bernoulli`` also rounds the delta itself through float32
    (``tensor.to(float32)``), so float64 agrees only to float32 precision.
    """
    deltas = make_deltas(dtype)
    for method, extra in (("dare_linear", {}), ("dare_ties", {"normalize": "none"})):
        generator = torch.Generator().manual_seed(4)
        merge = mg.get_merge_method(method)
        ours = merge(deltas, WEIGHTS, density=0.4, generator=generator, rescale=False, **extra)
        torch.manual_seed(4)
        theirs = mergekit_delta(method, deltas, WEIGHTS, density=0.4, rescale=False)
        assert_rel(ours, theirs, torch.float32)
        assert not torch.allclose(ours, plain_sum(deltas, WEIGHTS))


# --------------------------------------------------------------------- breadcrumbs


@pytest.mark.parametrize("dtype", DTYPES)
def test_breadcrumbs_match_mergekit(dtype):
    deltas = make_deltas(dtype)
    ours = mg.breadcrumbs(deltas, WEIGHTS, density=0.3, gamma=0.05)
    assert_rel(ours, mergekit_delta("breadcrumbs", deltas, WEIGHTS, density=0.3, gamma=0.05), dtype)
    tied = mg.breadcrumbs_ties(deltas, WEIGHTS, density=0.3, gamma=0.05, normalize="none")
    assert_rel(tied, mergekit_delta("breadcrumbs_ties", deltas, WEIGHTS, density=0.3, gamma=0.05), dtype)
    normalized = mg.breadcrumbs_ties(deltas, WEIGHTS, density=0.3, gamma=0.05)
    expected = mergekit_delta("breadcrumbs_ties", deltas, WEIGHTS, density=0.3, gamma=0.05, normalize=True)
    assert_rel(normalized, expected, dtype)
    assert not torch.allclose(ours, tied) and not torch.allclose(ours, plain_sum(deltas, WEIGHTS))


# ----------------------------------------------------------------------------- PCB


def pcb_reference(deltas, weights, ratio):
    """Slow, literal transcription of the PCB-Merging equations (one task at a time)."""
    n, flat = len(deltas), [d.reshape(-1) for d in deltas]
    d_count = flat[0].numel()

    def norm(x):
        return (x - x.min()) / (x.max() - x.min())

    def softmax(x):
        e = torch.exp(x - x.max())
        return e / e.sum()

    betas = []
    for i in range(n):
        intra = softmax(n * norm(flat[i] * flat[i]))
        inter = sum(softmax(norm(flat[i] * flat[j])) for j in range(n))
        beta = intra * inter
        threshold = torch.sort(beta).values[int((1 - ratio) * d_count)]
        betas.append(torch.where(beta >= threshold, beta, torch.zeros_like(beta)))
    numerator = sum(w * b * t for w, b, t in zip(weights, betas, flat))
    denominator = sum(betas)
    merged = torch.where(denominator > 0, numerator / torch.where(denominator > 0, denominator, 1), 0)
    return merged.reshape(deltas[0].shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ratio", [0.1, 0.5, 1.0])
def test_pcb_matches_the_paper_equations(dtype, ratio):
    deltas = make_deltas(dtype)
    ours = mg.pcb(deltas, WEIGHTS, ratio=ratio)
    assert_rel(ours, pcb_reference(deltas, WEIGHTS, ratio), dtype)
    assert not torch.allclose(ours, plain_sum(deltas, WEIGHTS) / 3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pcb_invariants(dtype):
    deltas = make_deltas(dtype)
    n = deltas[0].numel()
    single = mg.pcb(deltas[:1], [2.0], ratio=0.1)
    kept = single != 0
    assert int(kept.sum()) == n - int(0.9 * n)
    assert_rel(single[kept], 2.0 * deltas[0][kept], dtype)  # one task: w * tau on its kept entries
    assert_rel(mg.pcb([deltas[0]] * 3, UNIT, ratio=1.0), deltas[0], dtype)  # identical tasks: tau itself
    permuted = mg.pcb(deltas[::-1], WEIGHTS[::-1], ratio=0.2)
    assert_rel(permuted, mg.pcb(deltas, WEIGHTS, ratio=0.2), dtype)
    with_zero = mg.pcb([deltas[0], torch.zeros_like(deltas[0])], [1.0, 1.0], ratio=0.2)
    assert torch.isfinite(with_zero).all() and with_zero.any()


# ----------------------------------------------------------------------- LoRA cat


def make_loras(dtype):
    generator = torch.Generator().manual_seed(1)
    ranks = (2, 3)
    return [
        (torch.randn(r, 24, generator=generator).to(dtype), torch.randn(16, r, generator=generator).to(dtype))
        for r in ranks
    ]


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_concat_is_exact(dtype):
    loras, weights, scalings = make_loras(dtype), [0.7, -0.4], [1.5, 2.0]
    a_cat, b_cat = lora_concat(loras, weights, scalings)
    assert a_cat.shape == (5, 24) and b_cat.shape == (16, 5)
    expected = sum(w * s * (b @ a) for (a, b), w, s in zip(loras, weights, scalings))
    assert_rel(b_cat @ a_cat, expected, dtype)
    assert torch.equal(b_cat[:, :2], loras[0][1])  # B's are not scaled


def test_lora_concat_matches_peft_add_weighted_adapter_cat():
    from peft import LoraConfig, get_peft_model

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(24, 16, bias=False)

    torch.manual_seed(0)
    config = dict(target_modules=["proj"], init_lora_weights=False)
    model = get_peft_model(Tiny(), LoraConfig(r=2, lora_alpha=3, **config), adapter_name="math")
    model.add_adapter("code", LoraConfig(r=3, lora_alpha=5, **config))
    model.add_weighted_adapter(["math", "code"], [0.7, -0.4], "mix", combination_type="cat")
    layer = model.base_model.model.proj
    names = ("math", "code")
    loras = [(layer.lora_A[n].weight.detach(), layer.lora_B[n].weight.detach()) for n in names]
    a_cat, b_cat = lora_concat(loras, [0.7, -0.4], [layer.scaling[n] for n in names])
    with torch.no_grad():
        theirs = layer.get_delta_weight("mix")
        parts = [layer.get_delta_weight(n) for n in names]
    assert layer.scaling["mix"] == 1.0
    assert_rel(b_cat @ a_cat, theirs, torch.float32)
    assert_rel(b_cat @ a_cat, 0.7 * parts[0] - 0.4 * parts[1], torch.float32)
    assert torch.equal(a_cat, layer.lora_A["mix"].weight.detach())
    assert torch.equal(b_cat, layer.lora_B["mix"].weight.detach())


def test_lora_concat_bad_inputs_name_the_parameter():
    loras = make_loras(torch.float32)
    with pytest.raises(ValueError, match="scalings"):
        lora_concat(loras, [1.0, 1.0], [1.0])
    with pytest.raises(ValueError, match=r"weights\[0\]"):
        lora_concat(loras, [float("inf"), 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"loras\[1\]"):
        lora_concat([loras[0], (loras[1][0], loras[1][1][:, :2])], [1.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"loras\[1\]"):
        lora_concat([loras[0], (loras[1][0][:, :5], loras[1][1])], [1.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="loras"):
        lora_concat([], [], [])
