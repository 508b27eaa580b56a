"""Prompts: a request's ``prompt`` or ``messages`` -> token ids, the way vLLM's renderer makes them.

Truncation (``truncate_prompt_tokens``, ``truncation_side``), special tokens and
the context-length check are vLLM's own ``TokenizeParams`` (built by the request
model's ``build_tok_params``), so a prompt is cut and refused exactly as
``vllm serve`` would. Chats render with the model's chat template to text, then
tokenise like a completion prompt (``add_special_tokens`` defaults to false for
chats, as in vLLM). Only text content is served.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from deltaserve.server.vllm_compat import VLLMValidationError

from deltaserve.server.exceptions import InvalidRequest, from_vllm

# apply_chat_template's own parameters: a chat_template_kwargs entry may not override them.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs",
})
TEXT_PARTS = ("text", "input_text")
# generation_config.json keys vLLM reads as server-side sampling defaults (ModelConfig.get_diff_sampling_param)
GENERATION_DEFAULTS = ("repetition_penalty", "presence_penalty", "frequency_penalty", "temperature", "top_k",
                       "top_p", "min_p", "max_new_tokens")


@dataclass(frozen=True)
class Prompt:
    """One prompt as the engine gets it: token ids, and its text for echo and routing."""

    ids: list[int]
    text: str


def _vllm_checked(fn, *args: Any) -> Any:
    try:
        return fn(*args)
    except VLLMValidationError as err:
        raise from_vllm(err) from None


def _tok_params(req: Any, max_model_len: int) -> Any:
    return _vllm_checked(req.build_tok_params, SimpleNamespace(max_model_len=max_model_len))


def _encode(tokenizer: Any, text: str, params: Any) -> list[int]:
    """vLLM's tokenisation of ``text``: its encode kwargs, then its truncation and length check."""
    ids = list(tokenizer.encode(text, **params.get_encode_kwargs()))
    return _post_tokenization(tokenizer, ids, params)


def _post_tokenization(tokenizer: Any, ids: list[int], params: Any) -> list[int]:
    prompt = _vllm_checked(params.apply_post_tokenization, tokenizer, {"prompt_token_ids": list(ids)})
    return list(prompt["prompt_token_ids"])


def check_vocab(tokenizer: Any, ids: list[int], param: str) -> None:
    """Every id must be one of the tokenizer's (decodable) tokens."""
    size = len(tokenizer)
    bad = [i for i in ids if not 0 <= i < size]
    if bad:
        raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary (0..{size - 1})", param)


def completion_prompts(tokenizer: Any, req: Any, max_model_len: int) -> list[Prompt]:
    """A completion's prompts: a string, strings, token ids, or lists of token ids."""
    params = _tok_params(req, max_model_len)
    raw = req.prompt
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        raw = [raw]
    prompts = []
    for item in raw:
        if isinstance(item, str):
            ids = _encode(tokenizer, item, params)
            text = item if req.truncate_prompt_tokens is None else tokenizer.decode(ids)
        else:
            check_vocab(tokenizer, item, "prompt")
            ids = _post_tokenization(tokenizer, item, params)
            text = tokenizer.decode(ids)
        prompts.append(Prompt(ids, text))
    return prompts


def plain_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """The chat as role/content strings (text parts joined with newlines, as vLLM's ``string`` format), with
    the fields tool-use templates read kept as vLLM keeps them: ``name``, a tool message's ``tool_call_id``,
    an assistant's ``tool_calls`` with JSON ``arguments`` decoded to an object (``{}`` when not one)."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequest(f"messages[{i}] is not a chat message with a role and content", f"messages.{i}")
        plain: dict[str, Any] = {"role": "system" if m["role"] == "developer" else m["role"],
                                 "content": _text_content(m.get("content"), i)}
        if isinstance(m.get("name"), str):
            plain["name"] = m["name"]
        if m["role"] == "tool" and m.get("tool_call_id") is not None:
            plain["tool_call_id"] = m["tool_call_id"]
        if m["role"] == "assistant" and m.get("tool_calls"):
            plain["tool_calls"] = [_template_tool_call(c, i) for c in m["tool_calls"]]
        out.append(plain)
    return out


def _template_tool_call(call: Any, i: int) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or call.get("type", "function") != "function":
        raise InvalidRequest(f"messages[{i}].tool_calls: only calls of type 'function' are served",
                             f"messages.{i}.tool_calls")
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            arguments = {}
    return {**call, "function": {**function, "arguments": arguments if isinstance(arguments, dict) else {}}}


def _text_content(content: Any, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts, others = [], set()
    for part in content if isinstance(content, list) else [content]:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type", "text") in TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            others.add(str(part.get("type", "?")) if isinstance(part, dict) else type(part).__name__)
    if others:
        raise InvalidRequest(f"only text content is served; messages[{i}] has {sorted(others)}",
                       f"messages.{i}.content")
    return "\n".join(texts)


def render_chat(tokenizer: Any, req: Any, messages: list[dict[str, Any]], tools: list[dict] | None = None) -> str:
    """The chat as text, rendered with the model's template, the request's template options and ``tools``."""
    if getattr(req, "chat_template", None) is not None:
        raise InvalidRequest("request chat templates are not trusted; the model's own template is used",
                       "chat_template")
    kwargs = dict(req.chat_template_kwargs or {})
    if reserved := sorted(set(kwargs) & RESERVED_TEMPLATE_KWARGS):
        raise InvalidRequest(f"chat_template_kwargs may not set {reserved}", "chat_template_kwargs")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, documents=getattr(req, "documents", None),
                                             tools=tools,
                                             add_generation_prompt=getattr(req, "add_generation_prompt", True),
                                             continue_final_message=getattr(req, "continue_final_message", False),
                                             **kwargs)
    except Exception as err:  # noqa: BLE001 - template errors are the client's input
        raise InvalidRequest(f"cannot render these messages with the model's chat template: {err}",
                       "messages") from None


def chat_prompt(tokenizer: Any, req: Any, messages: list[dict[str, Any]], max_model_len: int,
                tools: list[dict] | None = None) -> Prompt:
    """The chat rendered and tokenised (no special tokens added unless the request asks, as in vLLM)."""
    text = render_chat(tokenizer, req, messages, tools)
    return Prompt(_encode(tokenizer, text, _tok_params(req, max_model_len)), text)


def tokenize_text(tokenizer: Any, req: Any) -> list[int]:
    """``/tokenize`` with a prompt: vLLM's ``TokenizeCompletionRequest``."""
    return _encode(tokenizer, req.prompt, _tok_params(req, 0))


def tokenize_chat(tokenizer: Any, req: Any) -> list[int]:
    """``/tokenize`` with messages: vLLM's ``TokenizeChatRequest``."""
    tools = [t if isinstance(t, dict) else t.model_dump() for t in req.tools] if getattr(req, "tools", None) else None
    text = render_chat(tokenizer, req, plain_messages(req.messages), tools)
    return _encode(tokenizer, text, _tok_params(req, 0))


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    """vLLM's ``/tokenizer_info``: the tokenizer's init kwargs (no file paths), its class and chat template."""
    def plain(value: Any) -> Any:
        if hasattr(value, "content"):
            return value.content
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value if isinstance(value, str | int | float | bool | type(None)) else str(value)

    config = {k: plain(v) for k, v in (getattr(tokenizer, "init_kwargs", None) or {}).items()
              if not k.endswith("_file") and k not in ("name_or_path", "tokenizer_file")}
    config["tokenizer_class"] = type(tokenizer).__name__
    if getattr(tokenizer, "chat_template", None):
        config["chat_template"] = tokenizer.chat_template
    return config


@lru_cache(maxsize=8)
def generation_defaults(base_dir: str) -> dict[str, Any]:
    """The model's sampling defaults from ``generation_config.json``, as vLLM reads them (``auto``)."""
    path = Path(base_dir) / "generation_config.json"
    if not os.path.isfile(path):
        return {}
    config = json.loads(path.read_text())
    out = {k: config[k] for k in GENERATION_DEFAULTS if config.get(k) is not None}
    if "max_new_tokens" in out:
        out["max_tokens"] = out.pop("max_new_tokens")
    return out


def max_new_tokens(requested: int | None, prompt_len: int, max_model_len: int, defaults: dict[str, Any]) -> int:
    """vLLM's ``get_max_tokens``: the request's (or the model's default) budget, clamped to the context left."""
    left = max_model_len - prompt_len
    fallback = requested if requested is not None else defaults.get("max_tokens")
    return min(v for v in (left, fallback) if v is not None)
