import pytest
import torch

from deltaserve.experts.nps import nps_search
from deltaserve.experts.nps_bands import band_ids, nps_prune
from deltaserve.experts.sparsify import magnitude, magnitude_global


@pytest.fixture
def taus():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(16, 24, generator=g), "b": torch.randn(40, generator=g)}


@pytest.mark.parametrize("per_tensor", [False, True])
def test_bands_split_by_magnitude_rank(taus, per_tensor):
    ids = band_ids(taus, 8, per_tensor)
    scopes = [taus] if not per_tensor else [{k: v} for k, v in taus.items()]
    for scope in scopes:
        flat = torch.cat([t.reshape(-1) for t in scope.values()]).abs()
        band = torch.cat([ids[k].reshape(-1) for k in scope]).long()
        counts = torch.bincount(band, minlength=8)
        assert counts.max() - counts.min() <= 1
        for m in range(7):  # every entry of band m is at least as large as every entry of band m+1
            assert flat[band == m].min() >= flat[band == m + 1].max()


@pytest.mark.parametrize("per_tensor", [False, True])
def test_unit_weights_are_magnitude_pruning(taus, per_tensor):
    ids = band_ids(taus, 8, per_tensor)
    pruned = nps_prune(taus, ids, [1.0] * 8, 0.1, per_tensor)
    expected = {k: magnitude(v, 0.1) for k, v in taus.items()} if per_tensor else magnitude_global(taus, 0.1)
    for k in taus:
        assert torch.equal(pruned[k], expected[k])


def test_reweighting_changes_which_entries_survive(taus):
    ids = band_ids(taus, 8)
    pruned = nps_prune(taus, ids, [0, 0, 1, 0, 0, 0, 0, 0], 0.1)
    kept = torch.cat([(pruned[k] != 0).reshape(-1) for k in taus])
    band = torch.cat([ids[k].reshape(-1) for k in taus])
    assert kept.any() and (band[kept] == 2).all()


def _band_target_objective(taus, target_band):
    """Cosine similarity with tau restricted to one band: magnitude pruning scores ~0."""
    ids = band_ids(taus, 8)
    target = torch.cat([torch.where(ids[k] == target_band, v, 0).reshape(-1) for k, v in taus.items()])

    def objective(pruned):
        flat = torch.cat([pruned[k].reshape(-1) for k in taus])
        return float(torch.nn.functional.cosine_similarity(flat, target, dim=0))

    return objective


def test_search_beats_magnitude_and_is_deterministic(taus):
    objective = _band_target_objective(taus, target_band=1)
    first = nps_search(taus, objective, density=0.125, bands=8, generations=15, seed=3, progress=False)
    again = nps_search(taus, objective, density=0.125, bands=8, generations=15, seed=3, progress=False)
    assert first.baseline_score < 0.05
    assert first.score > 0.8 > first.baseline_score
    assert first.weights == again.weights and first.history == again.history
    assert first.history == sorted(first.history)
    assert first.evaluations > 15 and len(first.weights) == 8
    assert all(0.0 <= w <= 4.0 for w in first.weights)


def test_bad_arguments(taus):
    with pytest.raises(ValueError, match="bands"):
        band_ids(taus, 0)
    with pytest.raises(ValueError, match="density"):
        nps_search(taus, lambda p: 0.0, density=0.0, progress=False)
    with pytest.raises(ValueError, match="generations"):
        nps_search(taus, lambda p: 0.0, generations=0, progress=False)
    with pytest.raises(ValueError, match="population"):
        nps_search(taus, lambda p: 0.0, population=1, progress=False)
    with pytest.raises(ValueError, match="max_weight"):
        nps_search(taus, lambda p: 0.0, max_weight=0.5, progress=False)


def test_max_weight_bounds_the_search(taus):
    objective = _band_target_objective(taus, target_band=1)
    result = nps_search(taus, objective, density=0.125, bands=8, generations=5, max_weight=1.5, seed=3,
                        progress=False)
    assert all(0.0 <= w <= 1.5 for w in result.weights)


@pytest.mark.parametrize("bands", [1, 3, 8])
@pytest.mark.parametrize("density", [0.001, 0.02, 0.3, 0.95])
def test_band_pruner_equals_nps_prune(bands, density):
    """The per-candidate fast path keeps exactly nps_prune's entries and values (tie-free random tau)."""
    from deltaserve.experts.nps_bands import BandPruner

    g = torch.Generator().manual_seed(bands)
    tau = {"a": torch.randn(120, 80, generator=g), "b": torch.randn(900, generator=g) * 3,
           "c": torch.randn(30, 20, generator=g).double() * 0.1}
    pruner, ids = BandPruner(tau, bands, density), band_ids(tau, bands)
    for w in ([1.0] * bands, (torch.rand(bands, generator=g) * 4).tolist(), [0.0] + [2.5] * (bands - 1)):
        got, want = pruner(w), nps_prune(tau, ids, w, density)
        for name in tau:
            assert got[name].dtype == tau[name].dtype and torch.equal(got[name], want[name]), (name, w)
        indexed = pruner.indexed(w)            # the search's form: same entries, by position
        assert sum(int(d.index.numel()) for d in indexed.values()) == pruner.k   # (a weight of 0 keeps zeros)
        for name in tau:
            assert torch.equal(indexed[name].to_dense(), got[name]), (name, w)
            assert indexed[name].index.unique().numel() == indexed[name].index.numel()


def test_band_pruner_keeps_exactly_k_with_ties():
    from deltaserve.experts.nps_bands import BandPruner

    tau = {"t": torch.tensor([1.0, -1.0, 1.0, 0.5, 0.5, -0.5, 0.25, 0.0, 0.0, 2.0])}
    for density in (0.1, 0.3, 0.5, 0.7):
        kept = BandPruner(tau, 2, density)([1.0, 1.0])["t"]
        assert int((kept != 0).sum()) == max(1, int(density * 10))


def test_delta_objective_adds_only_nonzero_entries_and_restores_the_model_exactly():
    """DeltaObjective scores base + deltas like swapped_weights(added_weights(...)) does, sparse or dense,
    and leaves every weight bit-identical afterwards (tied parameters get their delta once)."""
    from deltaserve.experts.calibration import DeltaObjective
    from deltaserve.experts.hfmodel import IndexedDelta, added_weights, swapped_weights

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 6))
    model[1].weight = torch.nn.Parameter(model[0].weight.t().contiguous())   # not tied: separate storage
    before = {k: v.clone() for k, v in model.state_dict().items()}

    class Probe:
        def score(self, m):
            return {k: v.clone() for k, v in m.state_dict().items()}

    sparse = {"0.weight": torch.zeros(5, 6).index_put_((torch.tensor([1, 3]), torch.tensor([2, 0])),
                                                        torch.tensor([0.5, -2.0]))}
    dense = {"0.weight": torch.randn(5, 6), "1.bias": torch.randn(6)}
    indexed = {"0.weight": IndexedDelta(torch.tensor([8, 18]), torch.tensor([0.5, -2.0]), torch.Size([5, 6])),
               "1.bias": IndexedDelta(torch.tensor([], dtype=torch.long), torch.tensor([]), torch.Size([6]))}
    for deltas in (sparse, dense, {}, indexed):
        got = DeltaObjective(model, Probe()).evaluate(deltas)
        plain = {k: d.to_dense() if isinstance(d, IndexedDelta) else d for k, d in deltas.items()}
        with swapped_weights(model, added_weights(model, plain)):
            want = Probe().score(model)
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(indexed["0.weight"].to_dense(), sparse["0.weight"])
    with pytest.raises(ValueError, match="shape"):
        DeltaObjective(model, Probe()).evaluate({"0.weight": torch.ones(6, 5)})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _Capped:
    """An objective with a known maximum (like DeltaObjective's all-exact score) that takes indexed deltas."""

    accepts_indexed = True

    def __init__(self, taus, maximum):
        self.inner, self.maximum, self.calls, self.kinds = _band_target_objective(taus, 1), maximum, 0, set()
        self.shapes = {k: v.shape for k, v in taus.items()}

    def __call__(self, pruned):
        self.calls += 1
        self.kinds.update(type(d).__name__ for d in pruned.values())
        dense = {k: d.to_dense() if hasattr(d, "to_dense") else d for k, d in pruned.items()}
        return min(self.maximum, self.inner(dense))


def test_search_stops_when_the_objective_reaches_its_maximum(taus):
    """No candidate can beat the objective's maximum, so the search stops there and says so; below the
    cap it runs every generation. Indexed candidates score like dense ones (same search, same result)."""
    free = nps_search(taus, _band_target_objective(taus, 1), density=0.125, generations=15, seed=3, progress=False)
    uncapped = _Capped(taus, maximum=2.0)
    same = nps_search(taus, uncapped, density=0.125, generations=15, seed=3, progress=False)
    assert uncapped.kinds == {"IndexedDelta"} and same.weights == free.weights and same.score == free.score
    assert len(same.history) == len(free.history) and "maximum" not in same.stop_reason
    capped = _Capped(taus, maximum=free.history[2])     # reached after the third generation
    stopped = nps_search(taus, capped, density=0.125, generations=15, seed=3, progress=False)
    assert stopped.score == free.history[2] and stopped.stop_reason == "reached the objective's maximum"
    assert len(stopped.history) <= 3 < len(free.history) and capped.calls == stopped.evaluations
    at_start = _Capped(taus, maximum=free.baseline_score)
    none = nps_search(taus, at_start, density=0.125, generations=15, seed=3, progress=False)
    assert none.evaluations == 1 and none.weights == (1.0,) * 8 and "maximum" in none.stop_reason


def test_search_stops_after_patience_generations_without_improvement(taus):
    """patience: the search ends once the best has not improved for that many generations, keeping the best
    it found (the same as a longer search that never improves again)."""
    full = nps_search(taus, _band_target_objective(taus, 1), density=0.125, generations=40, seed=3, progress=False)
    last = max(i for i, h in enumerate(full.history) if i == 0 or h > full.history[i - 1])   # last improvement
    short = nps_search(taus, _band_target_objective(taus, 1), density=0.125, generations=40, patience=2, seed=3,
                       progress=False)
    assert short.stop_reason == "no better candidate in 2 generations" or len(short.history) == len(full.history)
    assert short.history == full.history[:len(short.history)] and len(short.history) <= last + 3
    if len(full.history) > last + 3:
        assert short.weights == full.weights and short.score == full.score
    with pytest.raises(ValueError, match="patience"):
        nps_search(taus, _band_target_objective(taus, 1), patience=0, progress=False)
