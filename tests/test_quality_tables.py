"""bench.quality.tables on the micro zoo's vision suite with tiny budgets (seconds)."""

from __future__ import annotations

import json

import pytest
import torch

from bench.common import provenance
from bench.quality import suites as qs
from bench.quality import tables as qt

TINY = dict(generations=2, population=4, densities=(0.05,), interp_density=0.05, interp_lambdas=(0.5, 1.0),
            merge_lambdas=(0.5, 1.0), trim_densities=(0.2,))


@pytest.fixture(scope="module")
def suite(micro_zoo):
    return qs.vision_suite(micro_zoo.layout.root)


def test_cell_cache_resumes_only_under_the_same_budget(tmp_path):
    calls = []
    cache = qs.CellCache(tmp_path / "c.jsonl", "k1")
    assert cache.get("a", lambda: calls.append(1) or {"x": 1})["x"] == 1
    assert qs.CellCache(tmp_path / "c.jsonl", "k1").get("a", lambda: calls.append(2) or {"x": 2})["x"] == 1
    assert qs.CellCache(tmp_path / "c.jsonl", "k2").get("a", lambda: calls.append(3) or {"x": 3})["x"] == 3
    assert calls == [1, 3]


def test_nps_with_unit_weights_is_the_stored_magnitude_expert(suite, tmp_path):
    tv = next(iter(suite.tvs.values()))
    magnitude, manifest = qt.stored(tv, "magnitude", tmp_path, density=0.05, seed=0)
    nps = qt.nps_from_weights(tv, [1.0] * 8, 0.05, True, tmp_path)
    # Elias-Fano positions: about log2(1/0.05) + 2 = 6.3 bits per kept entry instead of a 1-bit/param mask
    assert manifest["codec"] == "sparse_ef" and 0.05 * 16 < manifest["bits_per_param"] < 0.06 * (16 + 7)
    for name, delta in magnitude.items():
        assert torch.equal(nps[name], delta)
    assert any(not torch.equal(d, tv.deltas[n]) for n, d in magnitude.items())  # it did prune


def test_merged_delta_task_arithmetic_is_the_sum(suite):
    taus = [tv.deltas for tv in suite.tvs.values()]
    merged = qt.merged_delta(taus, "task_arithmetic", {}, 0)
    for name, value in merged.items():
        torch.testing.assert_close(value, sum(t[name] for t in taus))


def test_run_suite_tiny_writes_tables_and_resumes(suite, tmp_path):
    budget = qs.Budget(**TINY)
    record = provenance(command="pytest")
    results = qt.run_suite(suite, budget, tmp_path, record, log=lambda _: None, dare_seeds=(0, 1))
    for name in ("vision.json", "vision.md", "vision_compression.png", "vision_interpolation.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "vision.json").read_text())
    assert saved["command"] == "pytest" and saved["budget_key"] == budget.key()
    assert {k: saved[k] for k in record} == record  # the provenance record, as given
    summary = saved["compression"]["summary"]
    assert set(summary) == {f"{m}/0.05" for m in qt.COMPRESSORS}
    assert summary["tswitch/0.05"]["bits_per_param"] < summary["magnitude/0.05"]["bits_per_param"]
    for cell in saved["compression"]["cells"]["nps/0.05"].values():  # NPS starts from magnitude pruning
        assert cell["calibration_score"] >= cell["search"]["baseline_score"]
        assert 0.0 <= cell["accuracy"] <= 1.0
    for choice in saved["merging"].values():
        assert choice["lambda"] in budget.merge_lambdas and 0.0 <= choice["test_mean"] <= 1.0
    assert "| NPS |" in (tmp_path / "vision.md").read_text()
    spread = saved["compression"]["dare_seeds"]["0.05"]
    assert spread["seeds"] == [0, 1] and spread["retained_pct"][0] == summary["dare/0.05"]["retained_pct"]
    assert spread["min"] <= spread["max"] and "| DARE, seeds 0, 1: min–max |" in (tmp_path / "vision.md").read_text()
    lines = (tmp_path / "cells-vision.jsonl").read_text().count("\n")
    again = qt.run_suite(suite, budget, tmp_path, record, log=lambda _: None, dare_seeds=(0, 1))
    assert (tmp_path / "cells-vision.jsonl").read_text().count("\n") == lines  # everything came from the cache
    assert again["compression"] == results["compression"] and again["merging"] == results["merging"]


def test_real_merging_nps_row_prunes_each_tau_with_its_searched_band_weights(tmp_path):
    """The eq. 7 NPS row: each tau pruned by its own band weights (unit weights = global magnitude
    pruning), then summed; the weights come from the compression bench's NPS cells, and a missing
    skill names the command that makes its cell."""
    from bench.quality import real_merging as rm
    from deltaserve.experts.nps_bands import BandPruner
    from deltaserve.experts.sparsify import magnitude_global

    g = torch.Generator().manual_seed(0)
    taus = [{"a": torch.randn(40, 30, generator=g), "b": torch.randn(50, generator=g)} for _ in range(2)]
    weights = [[1.0] * rm.NPS_BANDS, [3.0, 0.5, 1.0, 2.0, 0.0, 1.0, 1.5, 4.0]]
    got = rm.merged_deltas(taus, "pruned:nps", {}, 2.0, weights)
    second = BandPruner(taus[1], rm.NPS_BANDS, rm.PRUNE_DENSITY)(weights[1])
    first = magnitude_global(taus[0], rm.PRUNE_DENSITY)
    for name in ("a", "b"):
        assert torch.equal(got[name], 2.0 * torch.stack([first[name], second[name]]).sum(0))
    cells = tmp_path / "cells.jsonl"
    cells.write_text("\n".join(json.dumps(c) for c in [
        {"skill": "x", "method": "nps", "options": {"density": rm.PRUNE_DENSITY}, "nps": {"weights": weights[1]}},
        {"skill": "y", "method": "nps", "options": {"density": 0.01}, "nps": {"weights": weights[0]}}]))
    assert rm.nps_weights(["x"], cells) == [weights[1]]
    with pytest.raises(SystemExit, match="--skills y"):
        rm.nps_weights(["x", "y"], cells)
