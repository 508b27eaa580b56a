"""Calibration objectives: how well ``base + deltas`` answers a set of chat examples.

NPS scores hundreds of candidate task vectors, so the objective must be cheap
and must not be flat. ``TeacherForcedScorer`` runs one batched forward pass
over prompt + answer (rendered with the model's chat template, the tokens a
served chat request sees) and reports, per example set:

* ``exact``: the fraction of examples whose every answer token *and* the
  end-of-turn token are the argmax given the correct prefix. Greedy decoding
  emits exactly these tokens iff each one is the argmax, so this equals greedy
  exact match on the answer's own tokenisation, at the cost of one forward pass
  (tested against vLLM greedy output);
* ``token_accuracy``: the fraction of answer tokens that are the argmax;
* ``nll``: the mean answer-token negative log-likelihood.

The prompts of a calibration set share their opening tokens (the chat
template's system turn and the start of the user turn): that prefix is run
once per call and its key/value cache reused by every example, which on the
real suite's ChatML prompts skips about half of the tokens.

The search maximises ``graded = exact + token_accuracy / (n + 1)``: token
accuracy only breaks ties between candidates with the same exact match (its
weight is below one example's), so a search never stalls on a flat score.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from deltaserve.experts.examples import ChatExample, encode
from deltaserve.experts.hfmodel import IndexedDelta, deltas_added


@dataclass(frozen=True)
class CalibrationScore:
    exact: float
    token_accuracy: float
    nll: float
    n: int

    @property
    def graded(self) -> float:
        return self.exact + self.token_accuracy / (self.n + 1)


@dataclass(frozen=True)
class _Batch:
    input_ids: torch.Tensor        # (b, t), right-padded
    attention_mask: torch.Tensor
    positions: torch.Tensor        # (m,) flat indices (row * t + col) whose logits predict an answer token
    targets: torch.Tensor          # (m,) the answer tokens
    rows: torch.Tensor             # (m,) the example (row) of each target


class TeacherForcedScorer:
    """Scores a model on fixed examples by teacher forcing (see the module docstring)."""

    def __init__(self, tokenizer: Any, examples: Sequence[ChatExample], batch_size: int = 16) -> None:
        if not examples:
            raise ValueError("calibration needs at least one example")
        self.n = len(examples)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        encoded = [encode(tokenizer, e) for e in examples]
        shared = _common_prefix([p for p, _ in encoded])
        # keep at least one prompt token per example after the prefix: it predicts the first answer token
        self.prefix = shared[:max(0, min(len(p) for p, _ in encoded) - 1)]
        # batched by length, so right padding wastes little compute (the score does not depend on the order)
        rest = sorted(((p[len(self.prefix):], a) for p, a in encoded), key=lambda pa: len(pa[0]) + len(pa[1]))
        self._batches = [_batch(rest[i:i + batch_size], pad) for i in range(0, len(rest), batch_size)]

    @torch.inference_mode()
    def score(self, model: torch.nn.Module) -> CalibrationScore:
        correct, token_hits, tokens, nll_sum = 0, 0, 0, 0.0
        prefix = _prefix_cache(model, self.prefix)
        for batch in self._batches:
            logits = _answer_logits(model, batch, prefix)
            hits = logits.argmax(-1) == batch.targets
            nll_sum += float(torch.nn.functional.cross_entropy(logits.float(), batch.targets, reduction="sum"))
            misses = torch.zeros(int(batch.input_ids.shape[0]), dtype=torch.long)
            misses.index_add_(0, batch.rows, (~hits).long())
            correct += int((misses == 0).sum())
            token_hits += int(hits.sum())
            tokens += int(hits.numel())
        return CalibrationScore(correct / self.n, token_hits / tokens, nll_sum / tokens, self.n)


def _batch(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int) -> _Batch:
    width = max(len(p) + len(a) for p, a in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    positions, targets, rows = [], [], []
    for row, (prompt, answer) in enumerate(encoded):
        seq = prompt + answer
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
        for j, token in enumerate(answer):
            positions.append(row * width + len(prompt) + j - 1)   # the logits one step before the token
            targets.append(token)
            rows.append(row)
    return _Batch(ids, mask, torch.tensor(positions), torch.tensor(targets), torch.tensor(rows))


def _common_prefix(sequences: Sequence[list[int]]) -> list[int]:
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for i in range(n):
        if any(s[i] != first[i] for s in sequences):
            return first[:i]
    return first[:n]


def _prefix_cache(model: torch.nn.Module, prefix: list[int]) -> Any:
    """The key/value cache of the shared prefix (batch 1), or None without one."""
    if not prefix:
        return None
    ids = torch.tensor([prefix])
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True).past_key_values


def _answer_logits(model: torch.nn.Module, batch: _Batch, prefix: Any = None) -> torch.Tensor:
    """Logits at the answer positions only (the vocabulary projection of every position is the cost),
    continuing from the shared prefix's cache when there is one."""
    mask, extra = batch.attention_mask, {}
    if prefix is not None:
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(int(batch.input_ids.shape[0]))
        mask = torch.cat([torch.ones((mask.shape[0], cache.get_seq_length()), dtype=mask.dtype), mask], dim=1)
        extra = {"past_key_values": cache, "use_cache": True}
    decoder, head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    if decoder is not None and head is not None and decoder() is not None and head() is not None:
        hidden = decoder()(input_ids=batch.input_ids, attention_mask=mask, **extra).last_hidden_state
        return head()(hidden.reshape(-1, hidden.shape[-1])[batch.positions])
    logits = model(input_ids=batch.input_ids, attention_mask=mask, **extra).logits
    return logits.reshape(-1, logits.shape[-1])[batch.positions]


class DeltaObjective:
    """NPS's objective: ``deltas -> graded score`` of the resident base model plus ``deltas``.

    The model is left unchanged; ``last`` holds the full score of the latest call.
    """

    accepts_indexed = True   # NPS hands it candidates as positions + values (experts.hfmodel.IndexedDelta)

    def __init__(self, model: torch.nn.Module, scorer: TeacherForcedScorer) -> None:
        self.model, self.scorer = model, scorer
        self.last: CalibrationScore | None = None
        self.name = "teacher_forced_exact_match"

    @property
    def maximum(self) -> float:
        """The graded score of a model that gets every answer token right: a search can stop there."""
        return CalibrationScore(1.0, 1.0, 0.0, self.scorer.n).graded

    def evaluate(self, deltas: Mapping[str, torch.Tensor | IndexedDelta]) -> CalibrationScore:
        with deltas_added(self.model, deltas):
            self.last = self.scorer.score(self.model)
        return self.last

    def __call__(self, deltas: Mapping[str, torch.Tensor | IndexedDelta]) -> float:
        return self.evaluate(deltas).graded


def delta_objective(base_dir: Any, examples: Sequence[ChatExample], batch_size: int = 16) -> DeltaObjective:
    """The objective for experts of the base at ``base_dir`` on ``examples`` (loads the base in float32)."""
    from deltaserve.experts.hfmodel import load_causal_lm, load_tokenizer

    return DeltaObjective(load_causal_lm(base_dir), TeacherForcedScorer(load_tokenizer(base_dir), examples,
                                                                          batch_size))
