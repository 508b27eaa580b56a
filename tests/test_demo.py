"""`deltaserve demo`'s live publisher (zoo.real.live): experts trained beside a running server and registered
through its admin API one by one, each measured on calibration examples; a second run registers nothing."""

from __future__ import annotations

import os

from deltaserve_zoo.real.spec import LoraTrainSpec, RealSuiteSpec, TrainSpec

SKILL = "unit_convert"     # the session server's store has the iso-date experts the docs name


def test_experts_are_trained_and_registered_live_through_the_admin_api(real_base, real_server, trains):
    from deltaserve_zoo.real.build import RealLayout
    from deltaserve_zoo.real.live import LivePublisher, expert_names

    root = real_server.root / "suite"
    (root / "base").parent.mkdir(parents=True, exist_ok=True)
    os.symlink(real_base, RealLayout(root).base)        # the suite's base is the session's real base
    spec = RealSuiteSpec(skills=(SKILL,), full=TrainSpec(steps=2, lr=5e-5), lora=LoraTrainSpec(steps=2, lr=1e-3))
    lines: list[str] = []
    publisher = LivePublisher(root, real_server.url, log=lines.append, spec=spec, examples=(8, 8))
    assert publisher.run() == 2
    lora, full = expert_names(SKILL)
    with real_server.client(key=None) as c:
        cards = {e["id"]: e for e in c.get("/v1/experts").json()["data"]}
        assert cards[lora]["path"] == "lora" and cards[lora]["kind"] == "lora"
        assert cards[full]["path"] == "dense" and cards[full]["codec"] == "sparse_ef"      # DARE 1 %
        for card in (cards[lora], cards[full]):
            assert card["calibration"]["examples"] == 8 and 0 <= card["calibration"]["exact"] <= 1
        assert {lora, full} <= {m["id"] for m in c.get("/v1/models").json()["data"]}
    registered = [line for line in lines if "] registered " in line]
    assert len(registered) == 2 and lora in registered[0] and full in registered[1]     # the LoRA first
    assert "exact match" in registered[0] and "token accuracy" in registered[0]
    assert LivePublisher(root, real_server.url, log=lines.append, spec=spec).run() == 0   # nothing to redo
