"""Exact-match evaluation of causal LMs on the zoo tasks.

``TaskEvaluator`` tokenises a fixed set of examples once and then scores any
model (HF, PEFT-wrapped, or a base model with swapped-in weights) by batched
greedy decoding. Compression search calls it hundreds of times, so the
per-call work is only the forward passes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast

from deltaserve_zoo.tasks import Example, Split, exact_match, get_task
from deltaserve_zoo.tokenizer import format_prompt

_ANSWER_SLACK_TOKENS = 3


@dataclass(frozen=True)
class _Batch:
    examples: list[Example]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    max_new_tokens: int


class TaskEvaluator:
    """Score models on ``n`` examples per task of one split (deterministic in ``seed``)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        tasks: Sequence[str],
        split: Split = "test",
        n: int = 200,
        seed: int = 0,
        batch_size: int = 256,
    ):
        if not tasks:
            raise ValueError("TaskEvaluator needs at least one task")
        self.tokenizer = tokenizer
        self.tasks = list(tasks)
        self.batch_size = batch_size
        self._batches = {name: self._encode(get_task(name).examples(split, n, seed)) for name in tasks}

    def _encode(self, examples: list[Example]) -> list[_Batch]:
        answer_lens = self.tokenizer([e.answer for e in examples], add_special_tokens=False).input_ids
        max_new = max(len(a) for a in answer_lens) + _ANSWER_SLACK_TOKENS
        batches = []
        for start in range(0, len(examples), self.batch_size):
            chunk = examples[start : start + self.batch_size]
            enc = self._left_padded([format_prompt(e.question) for e in chunk])
            batches.append(_Batch(chunk, enc["input_ids"], enc["attention_mask"], max_new))
        return batches

    def _left_padded(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            return self.tokenizer(prompts, return_tensors="pt", padding=True)
        finally:
            self.tokenizer.padding_side = side

    def examples(self, task: str) -> list[Example]:
        return [e for b in self._batches[task] for e in b.examples]

    @torch.inference_mode()
    def predictions(self, model: torch.nn.Module, task: str) -> list[str]:
        """Greedy completions (decoded, special tokens dropped) for one task."""
        out: list[str] = []
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        for batch in self._batches[task]:
            config = GenerationConfig(
                max_new_tokens=batch.max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                bos_token_id=self.tokenizer.bos_token_id,
            )
            generated = model.generate(
                input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
                generation_config=config,
            )
            new_tokens = generated[:, batch.input_ids.shape[1] :]
            out.extend(self.tokenizer.batch_decode(new_tokens.cpu(), skip_special_tokens=True))
        return out

    def score(self, model: torch.nn.Module, tasks: Sequence[str] | None = None) -> dict[str, float]:
        """Exact-match accuracy in [0, 1] per task."""
        was_training = model.training
        model.eval()
        try:
            result = {}
            for name in tasks or self.tasks:
                preds = self.predictions(model, name)
                gold = self.examples(name)
                result[name] = sum(exact_match(p, e.answer) for p, e in zip(preds, gold)) / len(gold)
            return result
        finally:
            model.train(was_training)


@contextlib.contextmanager
def swapped_weights(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]
) -> Iterator[torch.nn.Module]:
    """Temporarily load ``state_dict`` (a subset of names is fine) into ``model``.

    The original tensors are restored on exit, bit-exactly, even on error.
    """
    params = dict(model.state_dict())
    unknown = sorted(set(state_dict) - set(params))
    if unknown:
        raise KeyError(f"state dict has {len(unknown)} names the model lacks, e.g. {unknown[:3]}")
    saved = {name: params[name].detach().clone() for name in state_dict}
    try:
        with torch.no_grad():
            for name, value in state_dict.items():
                if params[name].shape != value.shape:
                    raise ValueError(
                        f"{name}: shape {tuple(value.shape)} does not match model {tuple(params[name].shape)}"
                    )
                params[name].copy_(value)
        yield model
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def evaluate_state_dict(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    evaluator: TaskEvaluator,
    tasks: Sequence[str] | None = None,
) -> dict[str, float]:
    """Accuracy of ``model`` with ``state_dict`` swapped in (the model is left unchanged)."""
    with swapped_weights(model, state_dict):
        return evaluator.score(model, tasks)


def task_vector_objective(model: torch.nn.Module, evaluator: TaskEvaluator, task: str):
    """Callable ``deltas -> accuracy on task`` of ``model`` (the base) plus ``deltas``.

    This is NPS's default calibration objective; the model is left unchanged.
    """
    base = {name: value.detach().clone() for name, value in model.state_dict().items()}

    def objective(deltas: Mapping[str, torch.Tensor]) -> float:
        weights = {name: base[name] + delta.to(base[name].dtype) for name, delta in deltas.items()}
        return evaluate_state_dict(model, weights, evaluator, [task])[task]

    return objective
