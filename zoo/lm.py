"""Training loops for the zoo's tiny Llama: pretraining, full fine-tune, LoRA.

Plain PyTorch loops over HF ``LlamaForCausalLM`` (and PEFT-wrapped models);
seeded, single process, progress via tqdm. Fine-tuning puts the loss on the
answer tokens (and the closing EOS) only, as instruction tuning does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from deltaserve_zoo.spec import FinetuneSpec, LlamaSpec, PretrainSpec
from deltaserve_zoo.tasks import Example
from deltaserve_zoo.tokenizer import format_prompt

IGNORE_INDEX = -100


def make_llama(spec: LlamaSpec, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.hidden_size // spec.head_dim,
        num_key_value_heads=spec.hidden_size // spec.head_dim,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def _cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int):
    warmup = max(1, total_steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return max(0.05, 0.5 * (1 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _train(model: torch.nn.Module, batches, steps: int, lr: float, desc: str) -> float:
    """Run ``steps`` AdamW steps over ``batches(step) -> (input_ids, labels, mask)``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    scheduler = _cosine_schedule(optimizer, steps)
    device = params[0].device
    model.train()
    loss_value = float("nan")
    bar = tqdm(range(steps), desc=desc, leave=False, mininterval=1.0)
    for step in bar:
        input_ids, labels, mask = (t.to(device) for t in batches(step))
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
    model.eval()
    return loss_value


def pretrain(
    model: LlamaForCausalLM, token_ids: torch.Tensor, spec: PretrainSpec, seed: int
) -> float:
    """Next-token pretraining on random windows of one long token stream."""
    if token_ids.numel() <= spec.seq_len + 1:
        raise ValueError(f"pretraining stream of {token_ids.numel()} tokens is shorter than a window")
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(spec.seq_len)

    def batches(_step: int):
        starts = torch.randint(0, token_ids.numel() - spec.seq_len, (spec.batch_size,), generator=gen)
        window = token_ids[starts[:, None] + offsets]
        return window, window, torch.ones_like(window)

    return _train(model, batches, spec.steps, spec.lr, "pretrain")


def encode_supervised(
    tokenizer: PreTrainedTokenizerFast, examples: Sequence[Example]
) -> list[tuple[list[int], int]]:
    """Each example as (prompt+answer+EOS token ids, number of prompt tokens)."""
    prompts = tokenizer([format_prompt(e.question) for e in examples]).input_ids
    answers = tokenizer([e.answer for e in examples], add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    return [(p + a + [eos], len(p)) for p, a in zip(prompts, answers)]


def collate_supervised(encoded: Sequence[tuple[list[int], int]], pad_id: int):
    """Right-padded batch with labels only on answer tokens."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        mask[row, : len(ids)] = 1
    return input_ids, labels, mask


def finetune(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    examples: Sequence[Example],
    spec: FinetuneSpec,
    seed: int,
    desc: str,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> float:
    """Supervised fine-tune (all trainable parameters: full model or LoRA only).

    ``masks`` (parameter name -> 0/1 tensor): only the entries where the mask is
    1 move. Gradients are multiplied by the mask; with AdamW and no weight decay
    the other entries keep their values exactly. A trainable parameter without a
    mask is frozen.
    """
    handles = []
    for name, param in model.named_parameters():
        if masks is None or not param.requires_grad:
            continue
        if name not in masks:
            param.requires_grad_(False)
            continue
        mask = masks[name].to(device=param.device, dtype=param.dtype)
        handles.append(param.register_hook(lambda grad, mask=mask: grad * mask))
    try:
        return _finetune(model, tokenizer, examples, spec, seed, desc)
    finally:
        for handle in handles:
            handle.remove()


def _finetune(model, tokenizer, examples, spec: FinetuneSpec, seed: int, desc: str) -> float:
    encoded = encode_supervised(tokenizer, examples)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(encoded), generator=gen).tolist()

    def batches(step: int):
        start = step * spec.batch_size
        picked = [encoded[order[(start + j) % len(order)]] for j in range(spec.batch_size)]
        return collate_supervised(picked, tokenizer.pad_token_id)

    torch.manual_seed(seed)
    return _train(model, batches, spec.steps, spec.lr, desc)
