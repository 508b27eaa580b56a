"""OpenAI-compatible wire format, as pydantic models: vLLM's own request and response models, extended.

Completions and chat completions *are* vLLM's protocol models
(``vllm.entrypoints.openai.{completion,chat_completion}.protocol``): every field
vLLM accepts is parsed and validated by vLLM's code, and its
``to_sampling_params`` builds the engine's ``SamplingParams`` — so a new vLLM
field arrives with the next vLLM. deltaserve extends them (``model`` is a
recipe, bounds on ``n`` and prompt lists, valid Unicode) and decides once, in
four tables, what happens to each field: applied by the engine (``SAMPLING``),
applied by the serving layer (``SERVED``), accepted without effect as in vLLM
(``NO_EFFECT``), or refused with a 400 when set to anything but its default
(``REFUSED``). ``tests/test_server_http.py`` fails when a vLLM upgrade brings a
field no table names.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmChatCompletionRequest
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionResponse as VllmChatCompletionResponse
from vllm.entrypoints.openai.completion.protocol import CompletionRequest as VllmCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionResponse as VllmCompletionResponse
from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from vllm.entrypoints.serve.tokenize.protocol import DetokenizeResponse, TokenizeResponse  # noqa: F401 - re-exported
from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest
from vllm.exceptions import VLLMValidationError
from vllm.renderers.chat_utils import ChatCompletionMessageParam

from deltaserve.experts.sources import Compression
from deltaserve.server.errors import APIError

MAX_TEXT_DEPTH = 64
MAX_PROMPTS = 64
MAX_CHOICES = 16

# ---------------------------------------------------------------------------- what happens to each field

# Applied by the engine through vLLM's ``to_sampling_params``.
SAMPLING = frozenset({
    "allowed_token_ids", "bad_words", "frequency_penalty", "ignore_eos", "include_stop_str_in_output",
    "logit_bias", "logprob_token_ids", "logprobs", "max_completion_tokens", "max_tokens", "min_p", "min_tokens",
    "n", "presence_penalty", "prompt_logprobs", "repetition_detection", "repetition_penalty", "response_format",
    "seed", "skip_special_tokens", "spaces_between_special_tokens", "stop", "stop_token_ids", "stream_interval",
    "structured_outputs", "temperature", "top_k", "top_logprobs", "top_p",
})
# Applied by deltaserve's serving layer (prompt building, response shape).
SERVED = frozenset({
    "model", "prompt", "messages", "stream", "stream_options", "echo", "add_special_tokens",
    "truncate_prompt_tokens", "truncation_side", "return_token_ids", "return_tokens_as_token_ids", "request_id",
    "add_generation_prompt", "continue_final_message", "chat_template_kwargs", "documents", "return_prompt_text",
})
# Accepted and without effect here, as in vLLM without the matching server feature.
NO_EFFECT = {
    "user": "end-user id for abuse monitoring",
    "session_id": "affinity hint for routers in front of the server",
    "mm_payload": "render endpoints only",
    "return_mm_kwargs": "render endpoints only",
    "return_token_offsets": "render endpoints only",
    "routed_experts_prompt_start": "mixture-of-experts routing data, not returned by this server",
    "include_reasoning": "no reasoning parser: there is no reasoning to include",
    "parallel_tool_calls": "tools are refused",
}
# Refused with a 400 unless left at one of the listed values.
REFUSED: dict[str, tuple[str, tuple[Any, ...]]] = {
    "suffix": ("insertion (suffix) is not served", (None,)),
    "prompt_embeds": ("prompt embeddings are not served; send text or token ids", (None,)),
    "use_beam_search": ("beam search is not served", (False,)),
    "length_penalty": ("length_penalty applies to beam search, which is not served", (1.0,)),
    "watermarking": ("no watermark is configured on this server", (None, False)),
    "priority": ("priority scheduling is not enabled; deltaserve schedules by recipe", (0,)),
    "cache_salt": ("per-request prefix-cache salts are not served", (None,)),
    "kv_transfer_params": ("disaggregated serving is not configured", (None,)),
    "ec_transfer_params": ("disaggregated serving is not configured", (None,)),
    "vllm_xargs": ("no custom logits processors are installed to read vllm_xargs", (None,)),
    "thinking_token_budget": ("no reasoning parser is configured", (None,)),
    "reasoning_effort": ("no reasoning parser is configured", (None,)),
    "chat_template": ("request chat templates are not trusted; the model's own template is used", (None,)),
    "media_io_kwargs": ("the served models are text-only", (None,)),
    "mm_processor_kwargs": ("the served models are text-only", (None,)),
    "tools": (("tool calling needs a tool-call parser, which this server does not run; for structured output "
               "use response_format {\"type\": \"json_schema\"}"), (None,)),
    "tool_choice": ("tool calling needs a tool-call parser, which this server does not run", ("none", None)),
}
# OpenAI fields that are not in vLLM's models (vLLM drops them silently): refused when truthy.
LEGACY_REFUSED = {
    "best_of": "best_of is not served; use n",
    "functions": "function calling needs a tool-call parser, which this server does not run",
    "function_call": "function calling needs a tool-call parser, which this server does not run",
}


def field_policy(name: str) -> str:
    """``sampling`` / ``served`` / ``no_effect`` / ``refused`` for a request field, ``unknown`` otherwise."""
    for policy, names in (("sampling", SAMPLING), ("served", SERVED), ("no_effect", NO_EFFECT),
                          ("refused", REFUSED)):
        if name in names:
            return policy
    return "unknown"


# ---------------------------------------------------------------------------- request bases


def _check_utf8(value: Any, depth: int = 0) -> None:
    """Every string in a request must be encodable as UTF-8 (no lone surrogates from ``\\udXXX`` escapes)."""
    if depth > MAX_TEXT_DEPTH:
        raise ValueError(f"the request is nested deeper than {MAX_TEXT_DEPTH} levels")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text must be valid Unicode (it holds a lone surrogate)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_utf8(key, depth + 1)
            _check_utf8(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_utf8(item, depth + 1)


class _Body(BaseModel):
    """Base of every request body: strings must be valid Unicode."""

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        _check_utf8(data)
        return data


# Fields vLLM's own "before" validators read as containers: a wrong shape must be a 400, not their TypeError.
CONTAINER_FIELDS = {"messages": list, "tools": list, "structured_outputs": dict, "response_format": dict,
                    "stream_options": dict, "kv_transfer_params": dict, "ec_transfer_params": dict,
                    "chat_template_kwargs": dict, "tool_choice": (str, dict)}


class _VllmBody(_Body):
    """A body parsed by a vLLM model: vLLM's validation errors become 400s that name their parameter."""

    @model_validator(mode="wrap")
    @classmethod
    def _vllm_errors(cls, data: Any, handler: Any) -> Any:
        if isinstance(data, dict):
            for name, kind in CONTAINER_FIELDS.items():
                value = data.get(name)
                nullable = value is None and name != "messages"
                if name in data and not nullable and name in cls.model_fields and not isinstance(value, kind):
                    shape = "a list" if kind is list else "an object" if kind is dict else "a string or an object"
                    raise APIError(400, f"invalid request: `{name}` must be {shape}", name)
        try:
            return handler(data)
        except VLLMValidationError as err:
            raise APIError(400, str(err.args[0]) if err.args else str(err), err.parameter) from None
        except (TypeError, AttributeError, KeyError, IndexError) as err:   # vLLM's validators on odd shapes
            raise APIError(400, f"invalid request: {err}") from None


class _Generation(_VllmBody):
    """What deltaserve adds to vLLM's completion and chat requests."""

    model_config = ConfigDict(extra="allow")   # OpenAI-compatible servers accept unknown fields (as vLLM)
    model: str = Field(max_length=1000, description="the base, an expert, a recipe expression, or `auto`")
    n: int = Field(1, ge=1, le=MAX_CHOICES)

    def refused(self) -> list[tuple[str, str]]:
        """(field, why) for every field set to something this server does not serve."""
        out = [(name, why) for name, (why, allowed) in REFUSED.items()
               if name in type(self).model_fields and not any(_same(getattr(self, name), a) for a in allowed)]
        extra = self.model_extra or {}
        out += [(name, why) for name, why in LEGACY_REFUSED.items() if extra.get(name) not in (None, False, 0, 1, [])]
        return out

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def sampling(self, max_tokens: int, defaults: dict[str, Any]) -> Any:
        """vLLM's ``SamplingParams`` for this request; vLLM's checks become 400s naming the parameter."""
        try:
            return self.to_sampling_params(max_tokens, defaults)
        except VLLMValidationError as err:
            raise APIError(400, str(err.args[0]) if err.args else str(err), err.parameter) from None
        except (ValueError, TypeError) as err:
            raise APIError(400, f"invalid sampling parameters: {err}", "sampling") from None


def _same(value: Any, allowed: Any) -> bool:
    return value is allowed if allowed is None or isinstance(allowed, bool) else value == allowed


class CompletionRequest(_Generation, VllmCompletionRequest):
    """vLLM's ``CompletionRequest``: ``prompt`` is a string, a list of strings, token ids or lists of them."""

    @model_validator(mode="after")
    def _bounded_prompts(self) -> CompletionRequest:
        prompt = self.prompt
        if isinstance(prompt, list):
            if not prompt:
                raise APIError(400, "prompt must not be empty", "prompt")
            if not isinstance(prompt[0], int) and len(prompt) > MAX_PROMPTS:
                raise APIError(400, f"at most {MAX_PROMPTS} prompts per request, got {len(prompt)}", "prompt")
            if isinstance(prompt[0], list) and any(not p for p in prompt):
                raise APIError(400, "a token-id prompt must not be empty", "prompt")
        return self


class ChatCompletionRequest(_Generation, VllmChatCompletionRequest):
    """vLLM's ``ChatCompletionRequest`` with at least one message."""

    messages: list[ChatCompletionMessageParam] = Field(min_length=1)


class TokenizeCompletion(_VllmBody, TokenizeCompletionRequest):
    """POST /tokenize with a ``prompt`` (vLLM's shape)."""


class TokenizeChat(_VllmBody, TokenizeChatRequest):
    """POST /tokenize with ``messages`` (vLLM's shape)."""

    messages: list[ChatCompletionMessageParam] = Field(min_length=1)


class Detokenize(_VllmBody, DetokenizeRequest):
    """POST /detokenize (vLLM's shape)."""

    tokens: list[int] = Field(max_length=1 << 20)


class LoadLoRAAdapter(_VllmBody, LoadLoRAAdapterRequest):
    """POST /v1/load_lora_adapter (vLLM's shape): registers ``lora_path`` as the expert ``lora_name``."""

    lora_name: str = Field(min_length=1, max_length=64)
    lora_path: str = Field(min_length=1, max_length=4096, pattern=r"^[^\x00]*$")


class UnloadLoRAAdapter(_VllmBody, UnloadLoRAAdapterRequest):
    """POST /v1/unload_lora_adapter (vLLM's shape): deletes the expert ``lora_name``."""

    lora_name: str = Field(min_length=1, max_length=64)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ExpertRegistration(_Body):
    """POST /v1/experts body."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=64, description="the expert's name in `model` and in URLs")
    path: str = Field(min_length=1, max_length=4096, pattern=r"^[^\x00]*$",
                      description="server-side directory under an allowed root: an expert folder, a PEFT "
                                  "adapter or an HF fine-tuned model")
    compression: Compression | None = Field(None, description="how to compress a fine-tune: a method and its options")
    exemplars: list[str] | None = Field(None, description="example prompts for the routers")
    calibration: str | list[dict[str, Any]] | None = Field(
        None, description="chat examples ({messages} objects, or a JSONL path under a register root) to measure "
                          "the expert on: stored as its calibration score, which `auto` uses to prefer the "
                          "better expert of a skill; also NPS's objective unless compression.calibration is set")
    replace: bool = False


class RouteRequest(_Body):
    model_config = ConfigDict(extra="allow")
    model: str = "auto"
    messages: list[ChatMessage] | None = None
    prompt: str | None = None


# ---------------------------------------------------------------------------- responses


class ServedAs(BaseModel):
    """The ``deltaserve`` field of a non-streaming response: what the request was served with."""

    recipe: str
    path: Literal["base", "lora", "dense"]
    weights: dict[str, float]
    method: str
    options: dict[str, Any] = Field(default_factory=dict)
    route: dict[str, Any] | None = None


class CompletionResponse(VllmCompletionResponse):
    deltaserve: ServedAs | None = None


class ChatCompletionResponse(VllmChatCompletionResponse):
    deltaserve: ServedAs | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "deltaserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    deltaserve: dict[str, Any] = Field(default_factory=dict)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ExpertCard(BaseModel):
    id: str
    object: Literal["expert"] = "expert"
    kind: str
    codec: str
    density: float | None
    rank: int | None
    bytes: int
    bits_per_param: float
    base_params: int
    base_fingerprint: str
    source: str
    method: dict[str, Any]
    task: str | None
    calibration_score: float | None
    created: str
    path: Literal["base", "lora", "dense"]
    exemplars: int


class ExpertList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ExpertCard]
    store_generation: int
    unavailable: dict[str, str] = Field(default_factory=dict,
                                        description="experts in the store that cannot be served, and why")


class DeletedExpert(BaseModel):
    id: str
    object: Literal["expert"] = "expert"
    deleted: bool = True


class RouteResponse(BaseModel):
    model: str
    recipe: str
    path: Literal["base", "lora", "dense"]
    weights: dict[str, float]
    route: dict[str, Any] | None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
