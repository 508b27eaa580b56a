"""The pieces of OpenAI responses built from vLLM outputs: logprobs in both API shapes, and choices.

Formats follow vLLM's OpenAI server (``completion/serving.py``
``_create_completion_logprobs``, ``chat_completion/serving.py``
``_create_chat_logprobs``): a completion's ``top_logprobs`` keeps the sampled
token plus ``logprobs`` alternatives, a chat's ``top_logprobs`` the first
``top_logprobs`` entries; ``-inf`` becomes ``-9999.0`` (JSON has no infinity);
``return_tokens_as_token_ids`` writes tokens as ``token_id:<id>``. Plain dicts,
not pydantic objects: a stream builds one per token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

MIN_LOGPROB = -9999.0


def _clamp(value: float) -> float:
    return max(value, MIN_LOGPROB)


def token_text(logprob: Any, token_id: int, tokenizer: Any, as_ids: bool) -> str:
    if as_ids:
        return f"token_id:{token_id}"
    decoded = getattr(logprob, "decoded_token", None)
    return decoded if decoded is not None else tokenizer.decode([token_id])


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def completion_logprobs(token_ids: Sequence[int], steps: Sequence[Mapping[int, Any] | None], top_n: int,
                        tokenizer: Any, *, offset: int = 0, as_ids: bool = False, explicit: bool = False) -> dict:
    """``{"text_offset", "token_logprobs", "tokens", "top_logprobs"}`` for ``token_ids``; a step without
    logprobs (the first prompt token) gets ``None``."""
    offsets: list[int] = []
    values: list[float | None] = []
    tokens: list[str] = []
    tops: list[dict[str, float] | None] = []
    for token_id, step in zip(token_ids, steps):
        chosen = step.get(token_id) if step is not None else None
        if step is None or chosen is None:
            token = token_text(None, token_id, tokenizer, as_ids)
            values.append(None)
            tops.append(None)
        else:
            token = token_text(chosen, token_id, tokenizer, as_ids)
            values.append(_clamp(chosen.logprob))
            tops.append({token_text(lp, tid, tokenizer, as_ids): _clamp(lp.logprob)
                         for rank, (tid, lp) in enumerate(step.items())
                         if explicit or top_n == -1 or top_n >= rank})
        offsets.append(offset if not offsets else offsets[-1] + len(tokens[-1]))
        tokens.append(token)
    return {"text_offset": offsets, "token_logprobs": values, "tokens": tokens, "top_logprobs": tops}


def chat_logprobs(token_ids: Sequence[int], steps: Sequence[Mapping[int, Any] | None], top_n: int | None,
                  tokenizer: Any, *, as_ids: bool = False, explicit: bool = False) -> dict:
    """``{"content": [{"token", "logprob", "bytes", "top_logprobs"}, ...]}`` for ``token_ids``."""
    content = []
    for token_id, step in zip(token_ids, steps):
        chosen = step.get(token_id) if step is not None else None
        if step is None or chosen is None:
            token = token_text(None, token_id, tokenizer, as_ids)
            content.append({"token": token, "logprob": MIN_LOGPROB, "bytes": _utf8(token), "top_logprobs": []})
            continue
        top = []
        for rank, (tid, lp) in enumerate(step.items()):
            if explicit or top_n == -1 or (top_n is not None and rank < top_n):
                text = token_text(lp, tid, tokenizer, as_ids)
                top.append({"token": text, "logprob": _clamp(lp.logprob), "bytes": _utf8(text)})
        decoded = chosen.decoded_token
        content.append({"token": token_text(chosen, token_id, tokenizer, as_ids), "logprob": _clamp(chosen.logprob),
                        "bytes": None if decoded is None else _utf8(decoded), "top_logprobs": top})
    return {"content": content}


def prompt_logprobs_json(steps: Sequence[Mapping[int, Any] | None] | None) -> list | None:
    """vLLM's ``prompt_logprobs`` field: per prompt token ``{token_id: {logprob, rank, decoded_token}}``."""
    if steps is None:
        return None
    return [None if step is None else {str(tid): {"logprob": _clamp(lp.logprob), "rank": lp.rank,
                                                  "decoded_token": lp.decoded_token} for tid, lp in step.items()}
            for step in steps]


def completion_choice(index: int, text: str, finish_reason: str | None, stop_reason: Any = None,
                      logprobs: dict | None = None, **extra: Any) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason, **extra}


def chat_choice(index: int, message: str | dict, finish_reason: str | None, stop_reason: Any = None,
                logprobs: dict | None = None, **extra: Any) -> dict:
    """A whole chat choice: ``message`` is its text, or the message itself (with ``tool_calls``)."""
    if isinstance(message, str):
        message = {"role": "assistant", "content": message}
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason, **extra}


def chat_delta_choice(index: int, delta: str | dict, first: bool, finish_reason: str | None,
                      stop_reason: Any = None, logprobs: dict | None = None, **extra: Any) -> dict:
    """A streamed chat choice: the role comes with the first piece, empty content is left out; ``delta`` is
    the piece's text, or the delta itself (a tool call's)."""
    if isinstance(delta, str):
        delta = {"content": delta} if delta or first else {}
    if first:
        delta = {"role": "assistant", "content": "", **delta}
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason, **extra}
