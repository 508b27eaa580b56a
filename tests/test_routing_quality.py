"""Several experts of one skill: `auto` prefers the one with the better measured quality, and says so."""

from __future__ import annotations

from fastapi.testclient import TestClient

from deltaserve.experts.examples import ChatExample
from deltaserve.experts.sources import Compression
from deltaserve.experts.store import ExpertStore
from deltaserve.server.app import create_app
from deltaserve.server.settings import EngineConfig, RouterSettings, ServerSettings
from tests.fake_engine import FakeEngine
from deltaserve_zoo.tasks import get_task
from deltaserve_zoo.tokenizer import build_tokenizer


def test_store_scores_any_expert_given_calibration_examples(micro_zoo, tmp_path):
    store = ExpertStore(tmp_path / "store", micro_zoo.layout.base)
    seen = []

    def objective(deltas):
        seen.append(sorted(deltas))
        return 0.42

    manifest = store.import_source("lora", micro_zoo.layout.lora("upper"), objective=objective)
    assert manifest.calibration_score == 0.42 and seen and all(n.endswith(".weight") for n in seen[0])
    assert store.load("lora").manifest.calibration_score == 0.42
    unscored = store.import_source("plain", micro_zoo.layout.lora("upper"))
    assert unscored.calibration_score is None


def test_auto_prefers_the_better_measured_expert_of_a_skill(micro_zoo, tmp_path):
    store = ExpertStore(tmp_path / "store", micro_zoo.layout.base)
    task = get_task("max_digit")
    exemplars = [e.question for e in task.examples("calib", 24, seed=1)]
    # The same skill twice, with the same exemplars: the knn router splits its votes between them.
    store.import_source("max-digit-lora", micro_zoo.layout.lora("max_digit"), exemplars=exemplars,
                        objective=lambda deltas: 0.9)
    store.import_source("max-digit", micro_zoo.layout.full("max_digit"), exemplars=exemplars,
                        compression=Compression(method="magnitude", density=0.2), objective=lambda deltas: 0.3)
    settings = ServerSettings(store_dir=tmp_path / "store", engine=EngineConfig(base_dir=micro_zoo.layout.base),
                              router=RouterSettings(name="knn"))
    engine = FakeEngine(settings.engine, ExpertStore(tmp_path / "store", micro_zoo.layout.base), build_tokenizer())
    with TestClient(create_app(settings, engine=engine)) as c:
        question = task.examples("test", 1)[0].question
        route = c.post("/v1/route", json={"messages": [{"role": "user", "content": question}]}).json()
        assert route["recipe"] == "max-digit-lora", route
        assert route["route"]["quality"] == {"max-digit": 0.3, "max-digit-lora": 0.9}
        assert route["route"]["scores"]["max-digit-lora"] > 0.7


def test_registration_measures_quality_on_inline_calibration_examples(micro_zoo, tmp_path):
    settings = ServerSettings(store_dir=tmp_path / "store", engine=EngineConfig(base_dir=micro_zoo.layout.base),
                              register_roots=[micro_zoo.layout.root])
    engine = FakeEngine(settings.engine, ExpertStore(tmp_path / "store", micro_zoo.layout.base), build_tokenizer())
    calib = [ChatExample.of(e.question, e.answer).to_json() for e in get_task("upper").examples("calib", 16)]
    with TestClient(create_app(settings, engine=engine)) as c:
        r = c.post("/v1/experts", json={"name": "upper-lora", "path": str(micro_zoo.layout.lora("upper")),
                                        "calibration": calib})
        assert r.status_code == 201, r.text
        card = r.json()
        assert card["calibration_score"] is not None and 0.0 <= card["calibration_score"] <= 1.1
