"""Completions and chat completions: vLLM's own request and response models, extended.

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

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deltaserve.server.engine.types import PathName
from deltaserve.server.exceptions import InvalidRequest
from deltaserve.server.protocol.common import VllmBody, VllmSampling, policy_of
from deltaserve.server.vllm_compat import ChatCompletionMessageParam
from deltaserve.server.vllm_compat import ChatCompletionRequest as VllmChatCompletionRequest
from deltaserve.server.vllm_compat import ChatCompletionResponse as VllmChatCompletionResponse
from deltaserve.server.vllm_compat import CompletionRequest as VllmCompletionRequest
from deltaserve.server.vllm_compat import CompletionResponse as VllmCompletionResponse

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
    "tools", "tool_choice", "parallel_tool_calls",
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
}
# OpenAI fields that are not in vLLM's models (vLLM drops them silently): refused when truthy.
LEGACY_REFUSED = {
    "best_of": "best_of is not served; use n",
    "functions": "the legacy function-calling fields are not served; send `tools` (and `tool_choice`)",
    "function_call": "the legacy function-calling fields are not served; send `tools` (and `tool_choice`)",
}


def field_policy(name: str) -> str:
    """``sampling`` / ``served`` / ``no_effect`` / ``refused`` for a request field, ``unknown`` otherwise."""
    return policy_of(name, sampling=SAMPLING, served=SERVED, no_effect=NO_EFFECT, refused=REFUSED)


class _Generation(VllmSampling, VllmBody):
    """What deltaserve adds to vLLM's completion and chat requests."""

    if TYPE_CHECKING:   # from the vLLM request class that each concrete request below also derives from
        stream_options: Any

        def to_sampling_params(self, max_tokens: int, default_sampling_params: dict[str, Any]) -> Any: ...

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


def _same(value: Any, allowed: Any) -> bool:
    return value is allowed if allowed is None or isinstance(allowed, bool) else value == allowed


class CompletionRequest(_Generation, VllmCompletionRequest):
    """vLLM's ``CompletionRequest``: ``prompt`` is a string, a list of strings, token ids or lists of them."""

    @model_validator(mode="after")
    def _bounded_prompts(self) -> CompletionRequest:
        prompt = self.prompt
        if isinstance(prompt, list):
            if not prompt:
                raise InvalidRequest("prompt must not be empty", "prompt")
            if not isinstance(prompt[0], int) and len(prompt) > MAX_PROMPTS:
                raise InvalidRequest(f"at most {MAX_PROMPTS} prompts per request, got {len(prompt)}", "prompt")
            if isinstance(prompt[0], list) and any(not p for p in prompt):
                raise InvalidRequest("a token-id prompt must not be empty", "prompt")
        return self


class ChatCompletionRequest(_Generation, VllmChatCompletionRequest):
    """vLLM's ``ChatCompletionRequest`` with at least one message."""

    messages: list[ChatCompletionMessageParam] = Field(min_length=1)


class ServedAs(BaseModel):
    """The ``deltaserve`` field of a non-streaming response: what the request was served with."""

    recipe: str
    path: PathName
    reason: str | None = Field(None, description="why a recipe of experts takes the dense path, not LoRA")
    weights: dict[str, float]
    method: str
    options: dict[str, Any] = Field(default_factory=dict)
    route: dict[str, Any] | None = None


class CompletionResponse(VllmCompletionResponse):
    deltaserve: ServedAs | None = None


class ChatCompletionResponse(VllmChatCompletionResponse):
    deltaserve: ServedAs | None = None
