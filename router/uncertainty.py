"""Exemplar-free routing by the experts' own uncertainty.

A *scorer* maps (texts, expert names) to a matrix of mean token negative
log-likelihoods, (n_texts, n_experts); lower is better. Scores are
softmax(-nll / temperature), confidence the top score; there is no distance.

The server injects a scorer built on vLLM ``prompt_logprobs``;
:func:`hf_nll_scorer` is the same measurement with HF transformers + PEFT
adapters, for tests and benches (``target="prompt"``: NLL of the prompt tokens,
what ``prompt_logprobs`` gives; ``target="answer"``: NLL of each expert's own
greedy answer, i.e. its confidence in what it would say).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pydantic import Field

from deltaserve.experts.registry import Options, UnknownNameError
from deltaserve.router.base import ScoredText, register_router

NllScorer = Callable[[Sequence[str], Sequence[str]], np.ndarray]
NllTarget = Literal["prompt", "answer"]


def softmax_scores(nll: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise softmax(-nll / temperature)."""
    logits = -np.asarray(nll, dtype=np.float64) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


class UncertaintyOptions(Options):
    temperature: float = Field(0.1, gt=0.0, le=100.0, description="scores are softmax(-nll / temperature)")


@register_router("uncertainty", UncertaintyOptions, needs=("uncertainty_scorer",))
class UncertaintyRouter:
    """Exemplar-free: each expert's own confidence (mean token NLL) on the text."""

    needs_exemplars = False
    max_pending = 64   # texts that may wait for a routing call (server.service's RouteBatcher); more get a 503

    def __init__(self, scorer: NllScorer, temperature: float = 0.1):
        if not callable(scorer):
            raise ValueError("the uncertainty router needs a scorer: (texts, experts) -> NLL matrix")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.scorer = scorer
        self.temperature = temperature
        self._experts: tuple[str, ...] = ()

    @property
    def experts(self) -> tuple[str, ...]:
        return self._experts

    def fit(self, exemplars: Mapping[str, Sequence[str]]) -> None:
        """Only the expert names matter: this router needs no exemplars."""
        self._experts = tuple(sorted(exemplars))

    def add(self, expert: str, texts: Sequence[str] = ()) -> None:
        if not isinstance(expert, str) or not expert:
            raise ValueError(f"expert name must be a non-empty string, got {expert!r}")
        self._experts = tuple(sorted({*self._experts, expert}))

    def remove(self, expert: str) -> None:
        self._experts = tuple(n for n in self._experts if n != expert)

    def score(self, texts: Sequence[str], allowed: frozenset[str] | None = None) -> list[ScoredText]:
        names = self._experts if allowed is None else tuple(n for n in self._experts if n in allowed)
        if not names or not texts:
            return [({}, None) for _ in texts]
        nll = np.asarray(self.scorer(list(texts), list(names)), dtype=np.float64)
        if nll.shape != (len(texts), len(names)) or not np.isfinite(nll).all():
            raise ValueError(f"scorer returned shape {nll.shape} (finite: {np.isfinite(nll).all()}), "
                             f"expected finite ({len(texts)}, {len(names)})")
        probs = softmax_scores(nll, self.temperature)
        return [({n: float(p) for n, p in zip(names, row)}, None) for row in probs]


def mean_token_nll(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean NLL per row of ``targets`` (n, t) under ``logits`` (n, t, V), over ``mask`` 1s."""
    nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    mask = mask.to(nll.dtype)
    return (nll * mask).sum(1) / mask.sum(1).clamp(min=1)


class HFNllScorer:
    """Mean token NLL of texts under PEFT adapters on one HF base model (CPU or GPU)."""

    def __init__(self, base_dir: str | Path, adapters: Mapping[str, str | Path], *, target: NllTarget = "prompt",
                 max_new_tokens: int = 4, batch_size: int = 32, prompt_format: Callable[[str], str] | None = None,
                 device: str = "cpu"):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not adapters:
            raise ValueError("hf_nll_scorer needs at least one adapter")
        if target not in ("prompt", "answer"):
            raise ValueError(f"target must be 'prompt' or 'answer', got {target!r}")
        self.target, self.max_new_tokens, self.batch_size = target, max_new_tokens, batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        self.prompt_format = prompt_format or self._chat_prompt
        self._add_special_tokens = prompt_format is not None   # a rendered chat prompt holds its own BOS
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)
        names = sorted(adapters)
        self.model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(str(adapters[name]), adapter_name=name)
        self.model.eval()
        self.names = tuple(names)
        self.device = device
        self._lock = threading.Lock()  # set_adapter is model state

    def __call__(self, texts: Sequence[str], experts: Sequence[str]) -> np.ndarray:
        unknown = sorted(set(experts) - set(self.names))
        if unknown:
            raise UnknownNameError(f"unknown adapters {unknown}; known adapters: {list(self.names)}")
        out = np.zeros((len(texts), len(experts)))
        prompts = [self.prompt_format(t) for t in texts]
        with self._lock, torch.inference_mode():
            for j, name in enumerate(experts):
                self.model.set_adapter(name)
                for start in range(0, len(prompts), self.batch_size):
                    chunk = prompts[start : start + self.batch_size]
                    nll = self._prompt_nll(chunk) if self.target == "prompt" else self._answer_nll(chunk)
                    out[start : start + len(chunk), j] = nll.cpu().numpy()
        return out

    def _chat_prompt(self, text: str) -> str:
        """``text`` as a user turn in the model's chat template, ready for the answer."""
        return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=False)

    def _encode(self, prompts: list[str], side: str) -> dict[str, torch.Tensor]:
        self.tokenizer.padding_side = side
        return self.tokenizer(prompts, return_tensors="pt", padding=True,
                              add_special_tokens=self._add_special_tokens).to(self.device)

    def _prompt_nll(self, prompts: list[str]) -> torch.Tensor:
        enc = self._encode(prompts, "right")
        logits = self.model(**enc).logits[:, :-1]
        return mean_token_nll(logits, enc["input_ids"][:, 1:], enc["attention_mask"][:, 1:])

    def _answer_nll(self, prompts: list[str]) -> torch.Tensor:
        enc = self._encode(prompts, "left")
        tok = self.tokenizer
        out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id)
        new = out.sequences[:, enc["input_ids"].shape[1] :]
        logits = torch.stack(out.logits, dim=1)[:, : new.shape[1]]
        is_eos = (new == tok.eos_token_id).int()
        upto_eos = (is_eos.cumsum(1) - is_eos) == 0  # tokens up to and including the first EOS
        return mean_token_nll(logits, new, upto_eos)


def hf_nll_scorer(base_dir: str | Path, adapters: Mapping[str, str | Path], **options: Any) -> HFNllScorer:
    """A scorer for :class:`UncertaintyRouter` from a base model dir and ``{name: adapter_dir}``."""
    return HFNllScorer(base_dir, adapters, **options)
