"""Supervised fine-tuning of a causal LM on chat examples (loss on the answer only).

``finetune`` trains whatever parameters of ``model`` require a gradient: all of
them for a full fine-tune, only the adapters for a PEFT-wrapped model, or only
the entries selected by 0/1 ``masks`` (the sparse fine-tunes of the NPS family).
Examples go through the model's chat template (``experts.examples.encode``), so
an expert is trained on exactly the tokens a chat request produces at serving
time; the loss covers the answer tokens and the closing EOS, never the prompt.

Conventions, stated once:

- **Data order**: one seeded permutation of the examples, cycled; batch ``b``
  holds examples ``b*batch_size ... (b+1)*batch_size - 1`` of it. Same seed,
  same examples, same thread count -> same weights.
- **Optimizer**: AdamW (betas 0.9/0.999, eps 1e-8) *without* weight decay,
  gradient-norm clipping at 1.0, linear warm-up over the first 10 % of the
  steps, then cosine decay to 10 % of ``lr``.
- **Masks** (parameter name -> 0/1 tensor of the parameter's shape): gradients
  are multiplied by the mask in a hook, so Adam's moments of masked-out entries
  stay zero and those entries keep their values *exactly* (no weight decay). A
  trainable parameter without a mask is frozen for the run; a mask for a name
  that is not a trainable parameter is an error.
- **Logits only where the loss is**: the LM head runs only from the first
  answer position of the batch on (``logits_to_keep``), which saves its cost on
  the prompt tokens (~15 % of a SmolLM2-135M step on CPU).

This is the product's trainer (the real suite and the CLI use it); the toy
zoo's ``zoo.lm.finetune`` keeps its own loop for its char-level prompts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deltaserve.experts.examples import ChatExample, encode_all

IGNORE_INDEX = -100
WARMUP_SHARE = 0.1
MIN_LR_SHARE = 0.1
MAX_GRAD_NORM = 1.0


def collate(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``(input_ids, labels, attention_mask)``; labels are ``IGNORE_INDEX`` except
    on the answer tokens (which include the closing EOS)."""
    width = max(len(p) + len(a) for p, a in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (prompt, answer) in enumerate(encoded):
        ids = prompt + answer
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(prompt) : len(ids)] = torch.tensor(answer)
        mask[row, : len(ids)] = 1
    return input_ids, labels, mask


def answer_loss(model: torch.nn.Module, input_ids: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the labelled (answer) tokens of the batch.

    Equal to the HF ``labels=`` loss, but the LM head runs only on the positions that
    predict a labelled token (from the earliest answer start in the batch on).
    """
    labelled = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    if labelled.numel() == 0:
        raise ValueError("batch has no answer tokens to train on")
    first = int(labelled[0]) - 1          # the position whose logits predict the first answer token
    keep = input_ids.shape[1] - first
    logits = model(input_ids=input_ids, attention_mask=mask, logits_to_keep=keep).logits
    targets = torch.cat([labels[:, first + 1 :], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def lr_factor(step: int, steps: int) -> float:
    """Warm-up then cosine decay: the share of ``lr`` used at ``step`` (0-based)."""
    warmup = max(1, round(steps * WARMUP_SHARE))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return MIN_LR_SHARE + (1 - MIN_LR_SHARE) * 0.5 * (1 + math.cos(math.pi * progress))


def _mask_hooks(model: torch.nn.Module, masks: Mapping[str, Tensor]) -> tuple[list, list[torch.nn.Parameter]]:
    """Install gradient-masking hooks; freeze trainable parameters without a mask.
    Returns (hook handles, parameters frozen here) so the caller can undo both."""
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    unknown = sorted(set(masks) - set(trainable))
    if unknown:
        raise ValueError(f"masks name {len(unknown)} parameters that are not trainable in the model, "
                         f"e.g. {unknown[:3]}")
    handles, frozen = [], []
    for name, param in trainable.items():
        if name not in masks:
            param.requires_grad_(False)
            frozen.append(param)
            continue
        mask = masks[name]
        if tuple(mask.shape) != tuple(param.shape):
            raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, parameter {tuple(param.shape)}")
        mask = mask.to(device=param.device, dtype=param.dtype)
        handles.append(param.register_hook(lambda grad, mask=mask: grad * mask))
    return handles, frozen


def finetune(model: torch.nn.Module, tokenizer: Any, examples: Sequence[ChatExample], *, steps: int,
             batch_size: int, lr: float, seed: int, masks: Mapping[str, Tensor] | None = None,
             progress: bool = True, desc: str = "finetune") -> float:
    """Train ``model`` in place on ``examples``; returns the loss of the last step.

    See the module docstring for the data order, the optimizer and the ``masks`` contract.
    """
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"need steps >= 1, batch_size >= 1, lr > 0; got steps={steps}, "
                         f"batch_size={batch_size}, lr={lr}")
    if not examples:
        raise ValueError("finetune needs at least one example")
    handles, frozen = _mask_hooks(model, masks) if masks is not None else ([], [])
    try:
        return _train(model, tokenizer, examples, steps, batch_size, lr, seed, progress, desc)
    finally:
        for handle in handles:
            handle.remove()
        for param in frozen:
            param.requires_grad_(True)


def _train(model, tokenizer, examples, steps, batch_size, lr, seed, progress, desc) -> float:
    from tqdm import tqdm

    encoded = encode_all(tokenizer, examples)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed)).tolist()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps))
    device = params[0].device
    torch.manual_seed(seed)
    model.train()
    loss_value = float("nan")
    bar = tqdm(range(steps), desc=desc, leave=False, mininterval=1.0, disable=not progress)
    for step in bar:
        start = step * batch_size
        batch = [encoded[order[(start + j) % len(order)]] for j in range(batch_size)]
        loss = answer_loss(model, *(t.to(device) for t in collate(batch, pad_id)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
    model.eval()
    return loss_value


@torch.no_grad()
def answer_matches(model: torch.nn.Module, tokenizer: Any, examples: Sequence[ChatExample],
                   batch_size: int = 16) -> list[bool]:
    """Per example: would greedy decoding reproduce the answer token for token, EOS included?

    Greedy decoding emits the answer iff at every answer position the argmax given the
    answer's own prefix is the answer's next token, so one teacher-forced forward pass
    decides it (ties aside) -- far cheaper than generating. A reply that differs only in
    tokenization counts as a miss, so this is a lower bound of string exact match.
    """
    encoded = encode_all(tokenizer, examples)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    out: list[bool] = []
    try:
        for start in range(0, len(encoded), batch_size):
            input_ids, labels, mask = collate(encoded[start : start + batch_size], pad_id)
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            predicted = logits[:, :-1].argmax(dim=-1)
            targets = labels[:, 1:]
            hit = (predicted == targets) | (targets == IGNORE_INDEX)
            out.extend(hit.all(dim=1).tolist())
    finally:
        model.train(was_training)
    return out


def masked_trainer(base_dir: Path, examples: Sequence[ChatExample], options: Any
                   ) -> Callable[[Mapping[str, Tensor]], dict[str, Tensor]]:
    """The ``sparse_ft`` compressor's trainer: ``masks -> deltas``.

    Loads the base at ``base_dir`` (float32), fine-tunes only the masked entries on
    ``examples`` with ``options.steps`` / ``batch_size`` / ``lr`` / ``seed`` and returns,
    per masked parameter, the change it made (zero outside the mask by construction).
    """
    if not examples:
        raise ValueError("sparse_ft needs at least one training example")

    def train(masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        from deltaserve.experts.hfmodel import load_causal_lm, load_tokenizer

        model, tokenizer = load_causal_lm(Path(base_dir)), load_tokenizer(Path(base_dir))
        params = dict(model.named_parameters())
        unknown = sorted(set(masks) - set(params))
        if unknown:
            raise ValueError(f"the expert changes {len(unknown)} tensors the base has no parameter for, "
                             f"e.g. {unknown[:3]}")
        before = {name: params[name].detach().clone() for name in masks}
        finetune(model, tokenizer, examples, steps=options.steps, batch_size=options.batch_size, lr=options.lr,
                 seed=options.seed, masks=masks, progress=False, desc="sparse_ft")
        return {name: (params[name].detach() - before[name]).float() for name in masks}

    return train
