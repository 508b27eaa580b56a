"""experts.sparsify: exact invariants plus mergekit / PEFT as oracles (seeded, tiny)."""

from __future__ import annotations

import math

import mergekit.sparsify as mk_sparsify
import pytest
import torch

from deltaserve.experts import signs as sg
from deltaserve.experts import sparsify as sp
from deltaserve.experts.lowrank import lowrank
from oracles import DTYPES, RTOL, SHAPE, assert_rel, make_tau, peft_mu  # noqa: F401

N = SHAPE[0] * SHAPE[1]


# ------------------------------------------------------------------------ magnitude


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.05, 0.29, 0.5, 0.999, 1.0])
def test_magnitude_keeps_top_k_and_matches_mergekit(dtype, density):
    tau = make_tau(dtype)
    out = sp.magnitude(tau, density)
    k = max(1, int(density * N))  # 0.29 * 384 truncates like mergekit
    kept = out != 0
    assert int(kept.sum()) == k == sp.top_count(N, density)
    assert torch.equal(out[kept], tau[kept])
    if k < N:
        assert tau[kept].abs().min() > tau[~kept].abs().max()
        assert not torch.equal(out, tau)
    assert_rel(out, mk_sparsify.magnitude(tau, density), dtype)
    assert torch.equal(sp.ties_trim(tau, density), out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_magnitude_matches_peft_and_differs_below_one_entry(dtype):
    tau = make_tau(dtype)
    assert_rel(sp.magnitude(tau, 0.3), peft_mu.prune(tau, 0.3, method="magnitude"), dtype)
    # PEFT keeps int(density * n) = 0 entries here; we (like mergekit) keep one.
    tiny = 0.5 / N
    assert int((peft_mu.prune(tau, tiny, method="magnitude") != 0).sum()) == 0
    assert int((sp.magnitude(tau, tiny) != 0).sum()) == 1


def test_magnitude_ties_go_to_the_larger_flat_index():
    tau = torch.tensor([1.0, -1.0, 1.0, 0.5])
    assert sp.magnitude_mask(tau, 0.5).tolist() == [False, True, True, False]


@pytest.mark.parametrize("levels", [3, 50, None])  # heavy ties, some ties, continuous values
def test_fast_top_mask_equals_the_stable_sort_rule(levels):
    gen = torch.Generator().manual_seed(levels or 0)
    for trial in range(20):
        n = int(torch.randint(1, 400, (1,), generator=gen))
        key = torch.rand(n, generator=gen)
        if levels:
            key = torch.floor(key * levels)
        k = int(torch.randint(0, n + 1, (1,), generator=gen))
        expected = torch.zeros(n, dtype=torch.bool)
        if k:
            expected[torch.sort(key, stable=True).indices[n - k:]] = True
        got = sp._top_mask_flat(key, k)
        assert int(got.count_nonzero()) == k
        assert torch.equal(got, expected), (levels, trial, n, k)


def test_magnitude_global_uses_one_threshold():
    small, large = make_tau(torch.float32, 1), 10 * make_tau(torch.float32, 2)
    out = sp.magnitude_global({"small": small, "large": large}, 0.25)
    kept = {name: t != 0 for name, t in out.items()}
    assert sum(int(m.sum()) for m in kept.values()) == int(0.25 * 2 * N)
    pairs = (("small", small), ("large", large))
    kept_min = min(float(t[kept[name]].abs().min()) for name, t in pairs if kept[name].any())
    dropped_max = max(float(t[~kept[name]].abs().max()) for name, t in pairs)
    assert kept_min > dropped_max
    # The large tensor takes most of the budget, so this is not per-tensor top-k.
    assert int(kept["large"].sum()) > int(kept["small"].sum())
    assert not torch.equal(out["small"], sp.magnitude(small, 0.25))
    single = sp.magnitude_global({"t": small}, 0.25)["t"]
    assert torch.equal(single, sp.magnitude(small, 0.25))


# ----------------------------------------------------------------------------- DARE


def test_dare_generator_matches_peft_and_mergekit_float32():
    tau = make_tau(torch.float32)
    ours = sp.dare(tau, 0.3, torch.Generator().manual_seed(7))
    torch.manual_seed(7)
    theirs = peft_mu.prune(tau, 0.3, method="random", rescale=True)
    assert torch.equal(ours, theirs)
    for dtype in DTYPES:  # mergekit draws in float32 on CPU for every dtype, like us
        t = tau.to(dtype)
        torch.manual_seed(7)
        ours = sp.dare(t, 0.3, torch.Generator().manual_seed(7), rescale=False)
        assert_rel(ours, mk_sparsify.bernoulli(t, 0.3), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dare_with_injected_mask_matches_peft(dtype):
    tau = make_tau(dtype)
    torch.manual_seed(11)
    mask = torch.bernoulli(torch.full_like(tau, 0.4)).bool()  # PEFT's own draw
    torch.manual_seed(11)
    theirs = peft_mu.prune(tau, 0.4, method="random", rescale=True)
    ours = sp.dare(tau, 0.4, mask=mask)
    assert_rel(ours, theirs, dtype)
    assert torch.equal(ours != 0, mask)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dare_invariants(dtype):
    tau = make_tau(dtype)
    out = sp.dare(tau, 0.25, torch.Generator().manual_seed(3))
    kept = out != 0
    count = int(kept.sum())
    assert abs(count - 0.25 * N) < 4 * math.sqrt(N * 0.25 * 0.75)
    assert_rel(out[kept], tau[kept] / 0.25, dtype)
    same_mask = sp.dare(make_tau(torch.float32), 0.25, torch.Generator().manual_seed(3)) != 0
    assert torch.equal(kept, same_mask)  # mask depends on the seed, not the dtype
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    assert torch.equal(sp.dare(tau, 1.0, generator), tau)
    assert torch.equal(generator.get_state(), state)  # density 1 draws nothing


def test_dare_argument_errors():
    tau = make_tau(torch.float32)
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="generator"):
        sp.dare(tau, 0.5)
    with pytest.raises(ValueError, match="generator or mask"):
        sp.dare(tau, 0.5, generator, mask=tau > 0)
    with pytest.raises(ValueError, match="mask"):
        sp.dare(tau, 0.5, mask=(tau > 0).float())
    with pytest.raises(ValueError, match="mask"):
        sp.dare(tau, 0.5, mask=(tau > 0)[:2])


# ---------------------------------------------------------------------- breadcrumbs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("density", "gamma"), [(0.3, 0.01), (0.5, 0.1), (0.9, 0.2), (0.2, 0.0), (1.0, 0.05)])
def test_breadcrumbs_matches_mergekit_magnitude_outliers(dtype, density, gamma):
    tau = make_tau(dtype)
    out = sp.breadcrumbs(tau, density, gamma)
    assert_rel(out, mk_sparsify.magnitude_outliers(tau, density, gamma=gamma), dtype)
    kept = out != 0
    assert int(kept.sum()) == int(density * N)
    order = torch.argsort(tau.abs().reshape(-1), descending=True)
    n_top = min(int(gamma * N), N - int(density * N))  # outlier drop shrinks when it must
    assert not kept.reshape(-1)[order[:n_top]].any()
    if n_top:
        assert not torch.equal(out, sp.magnitude(tau, density))


# -------------------------------------------------------------------------- ternary


@pytest.mark.parametrize("dtype", DTYPES)
def test_ternary_scale_formula_and_norm(dtype):
    tau = make_tau(dtype)
    tau.view(-1)[:5] = 0.0  # exact zeros have no sign and are never kept
    t = sg.ternary(tau, 0.2)
    keep = sp.magnitude_mask(tau, 0.2)
    assert t.kept_count == int(keep.sum()) == max(1, int(0.2 * N))
    assert torch.equal(t.sign, torch.sign(tau).to(torch.int8) * keep)
    kept_norm = torch.linalg.vector_norm(tau[keep].double())
    assert t.scale == pytest.approx(float(kept_norm) / math.sqrt(t.kept_count), rel=1e-12)
    sign_norm = torch.linalg.vector_norm(t.sign[keep].double())
    assert t.scale == pytest.approx(float(kept_norm / sign_norm), rel=1e-12)
    dense = sg.ternary_dense(t, dtype=dtype)
    assert float(torch.linalg.vector_norm(dense.double())) == pytest.approx(float(kept_norm), rel=RTOL[dtype])
    assert torch.equal(dense != 0, keep) and torch.equal(torch.sign(dense), torch.sign(tau) * keep)
    assert not torch.equal(dense, sp.magnitude(tau, 0.2))  # values really were quantised
    dense_zero = sg.ternary_dense(sg.ternary(torch.zeros(SHAPE, dtype=dtype), 0.5), dtype=dtype)
    assert not dense_zero.any()


def test_ternary_tensor_rejects_bad_fields():
    mask = torch.tensor([True, False])
    with pytest.raises(ValueError, match="sign"):
        sg.TernaryTensor(mask=mask, sign=torch.tensor([1, 1], dtype=torch.int8), scale=1.0)
    with pytest.raises(ValueError, match="scale"):
        sg.TernaryTensor(mask=mask, sign=torch.tensor([-1, 0], dtype=torch.int8), scale=-1.0)


# ------------------------------------------------------------------------- low rank


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank", [1, 5, 16])
def test_lowrank_is_the_best_rank_r_approximation(dtype, rank):
    matrix = make_tau(dtype)
    a, b = lowrank(matrix, rank=rank)
    assert a.shape == (rank, SHAPE[1]) and b.shape == (SHAPE[0], rank) and a.dtype == b.dtype == dtype
    s = torch.linalg.svdvals(matrix.double())
    error = float(torch.linalg.matrix_norm((matrix - b @ a).double()))
    expected = float(torch.sqrt((s[rank:] ** 2).sum()))
    # Rounding floor relative to ||matrix||_F (a full-rank float32 residual is ~1e-6 of it).
    floor = (1e-6 if dtype == torch.float32 else 1e-12) * float(torch.linalg.matrix_norm(matrix.double()))
    assert error == pytest.approx(expected, rel=1e-5 if dtype == torch.float32 else 1e-10, abs=floor)
    # sqrt(S) split symmetrically: A A^T = B^T B = diag(S_r).
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close((a @ a.T).double(), torch.diag(s[:rank]), **tolerance)
    torch.testing.assert_close((b.T @ b).double(), torch.diag(s[:rank]), **tolerance)


@pytest.mark.parametrize("energy", [0.3, 0.9, 1.0])
def test_lowrank_energy_picks_the_smallest_sufficient_rank(energy):
    matrix = make_tau(torch.float64)
    a, _ = lowrank(matrix, energy=energy)
    r = a.shape[0]
    s2 = torch.linalg.svdvals(matrix) ** 2
    fraction = torch.cumsum(s2, 0) / s2.sum()
    assert fraction[r - 1] >= energy - 1e-12
    assert r == 1 or fraction[r - 2] < energy


# ----------------------------------------------------------------------- validation


@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan"), True, "0.5", None])
def test_bad_density_names_the_parameter(density):
    tau = make_tau(torch.float32)
    for call in (
        lambda: sp.magnitude(tau, density),
        lambda: sp.breadcrumbs(tau, density, 0.01),
        lambda: sp.dare(tau, density, torch.Generator()),
        lambda: sg.ternary(tau, density),
        lambda: sp.magnitude_global({"t": tau}, density),
    ):
        with pytest.raises(ValueError, match="density"):
            call()


def test_other_bad_arguments_name_the_parameter():
    tau = make_tau(torch.float32)
    for gamma in (1.0, -0.01, float("nan")):
        with pytest.raises(ValueError, match="gamma"):
            sp.breadcrumbs(tau, 0.5, gamma)
    with pytest.raises(ValueError, match="NaN or Inf"):
        sp.magnitude(torch.tensor([1.0, float("nan")]), 0.5)
    with pytest.raises(ValueError, match="floating"):
        sp.magnitude(torch.arange(4), 0.5)
    with pytest.raises(ValueError, match="tensors"):
        sp.magnitude_global({}, 0.5)
    for kwargs, name in (
        ({}, "rank or energy"),
        ({"rank": 2, "energy": 0.5}, "rank or energy"),
        ({"rank": 0}, "rank"),
        ({"rank": 17}, "rank"),
        ({"rank": 2.0}, "rank"),
        ({"energy": 0.0}, "energy"),
    ):
        with pytest.raises(ValueError, match=name):
            lowrank(tau, **kwargs)
    with pytest.raises(ValueError, match="2-D"):
        lowrank(tau.reshape(-1), rank=1)
