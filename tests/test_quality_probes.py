"""bench.quality.probes with tiny budgets: the width rebuild, the search probe and masked re-training."""

from __future__ import annotations

import torch

from bench.quality import probes as qp
from bench.quality import probes_llm as qpl
from bench.quality import suites as qs
from bench.quality.tables import COMPRESSORS


def test_width_probe_rebuilds_the_zoo_recipe_and_reports_each_width(tmp_path):
    budget = qs.Budget(calib_n=0, test_n=0, generations=2, population=4, densities=(0.05,),
                       interp_lambdas=(1.0,), merge_lambdas=(1.0,), trim_densities=(0.2,))
    record = {"command": "pytest", "git_commit": "commit"}
    rows = qp.run_width([(32, None), (32, 1e-3)], budget, tmp_path, record, lambda _: None,
                        tasks=["rot90", "invert"])
    assert list(rows) == ["h32", "h32-lr0.001"] and rows["h32-lr0.001"]["finetune_lr"] == 1e-3
    assert rows["h32"]["finetune_lr"] == 3e-3 and rows["h32"]["base_mean"] == rows["h32-lr0.001"]["base_mean"]
    assert rows["h32"]["finetuned_mean"] != rows["h32-lr0.001"]["finetuned_mean"]
    row = rows["h32"]
    assert row["body_params"] == 64 * 32 + 32 + 32 * 32 + 32
    assert 0.0 < row["base_mean"] <= 1.0 and 0.0 < row["finetuned_mean"] <= 1.0
    assert set(row["retained_pct"]) == {f"{m}/0.05" for m in COMPRESSORS}
    assert {"task_arithmetic", "nps_ta"} <= set(row["merge_test_mean"])
    table = qp.width_table(rows, [0.05])
    assert table.count("\n") == 4 and "| 32 | 0.003 | 3,136 |" in table and "| 32 | 0.001 | 3,136 |" in table
    # same recipe, same seed: the models are reproducible bit for bit
    base_a, tuned_a, _ = qp.vision_models(32, tasks=["rot90"])
    base_b, tuned_b, _ = qp.vision_models(32, tasks=["rot90"])
    assert all(torch.equal(tuned_a["rot90"][k], tuned_b["rot90"][k]) for k in tuned_a["rot90"])


def test_masked_finetune_moves_only_the_support(micro_zoo):
    from deltaserve.experts import sparsify
    from deltaserve.experts.taskvector import extract_full

    layout = micro_zoo.layout
    deltas, loss = qpl.masked_finetune(layout.root, "length", 0.05)
    tau = extract_full(layout.base, layout.full("length")).deltas
    assert loss == loss  # finite training loss
    moved = 0
    for name, delta in deltas.items():
        support = sparsify.magnitude(tau[name], 0.05) != 0
        assert not bool(delta[~support].any()), name
        moved += int(delta.count_nonzero())
    assert 0 < moved <= sum(sparsify.top_count(t.numel(), 0.05) for t in tau.values())


def test_search_probe_reports_each_config(micro_zoo, tmp_path):
    budget = qs.Budget(calib_n=8, test_n=8, generations=2, population=4)
    cache = qs.CellCache(tmp_path / "cells.jsonl", budget.key())
    configs = [{"generations": 1, "max_weight": 4.0}, {"generations": 2, "max_weight": 2.0}]
    out = qpl.run_search(micro_zoo.layout.root, budget, configs, cache, tmp_path, lambda _: None, ["length"])
    rows = list(out["rows"].values())
    assert [r["config"] for r in rows] == configs
    for row in rows:
        cell = row["cells"]["length"]
        assert cell["calibration"] >= cell["baseline_calibration"]  # the search starts at magnitude pruning
        assert all(0.0 <= w <= row["config"]["max_weight"] for w in cell["weights"])
    md = qpl.llm_tables(out, None, ["length"])
    assert "weights in [0, 2]" in md and "weights in [0, 4]" in md


def test_lr_probe_retrains_at_the_given_lr_and_compresses(micro_zoo, tmp_path):
    from deltaserve.experts.taskvector import extract_full

    budget = qs.Budget(calib_n=8, test_n=8, generations=1, population=2, densities=(0.05,))
    out = qpl.run_lr(micro_zoo.layout.root, [3e-4], tmp_path, tmp_path / "cache", lambda _: None, ["length"], budget)
    row = out["rows"]["0.0003"]
    learned = row["own_accuracy"]["length"] >= qpl.LEARNED  # 40 micro steps at a small lr may not learn it
    assert row["learned_tasks"] == (["length"] if learned else [])
    assert set(row["retained_pct"]) == ({f"{m}/0.05" for m in COMPRESSORS} if learned else set())
    assert 0.0 < row["energy_top_0.05"] < 1.0
    assert "| 0.0003 |" in qpl.lr_table(out, None)
    cached = tmp_path / "cache" / "lr0.0003-length.safetensors"
    assert cached.is_file()
    again = qpl.run_lr(micro_zoo.layout.root, [3e-4], tmp_path, tmp_path / "missing-cache", lambda _: None, ["length"],
                      budget)  # every cell cached: nothing is re-trained
    assert again["rows"] == out["rows"] and not (tmp_path / "missing-cache").exists()
    tv = qpl.lr_task_vectors(micro_zoo.layout.root, 3e-4, ["length"], tmp_path / "cache", lambda _: None)["length"]
    zoo = extract_full(micro_zoo.layout.base, micro_zoo.layout.full("length"))
    assert tv.deltas.keys() == zoo.deltas.keys() and tv.base_fingerprint == zoo.base_fingerprint
    assert any(not torch.equal(tv.deltas[k], zoo.deltas[k].float()) for k in tv.deltas)  # a different fine-tune
