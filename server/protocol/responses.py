"""The Responses API's request: vLLM's own ``ResponsesRequest``, extended as completions and chats are.

vLLM's model parses and validates every field and builds the engine's
``SamplingParams`` (``to_sampling_params``: ``max_output_tokens``, ``text.format``
as structured output, the sampling fields). deltaserve adds: ``model`` is a
recipe (the base when left out, as ``vllm serve`` serves its one model), and it
refuses what it does not serve with a 400 naming the field: responses are not
stored (as ``vllm serve`` without ``VLLM_ENABLE_RESPONSES_API_STORE``), so
``background`` and ``previous_response_id`` are refused; built-in tools (web
search, file search, code interpreter, MCP, ...) are refused, function tools
are served.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field

from deltaserve.server.protocol.common import VllmBody, VllmSampling, policy_of
from deltaserve.server.protocol.generation import REFUSED as CHAT_REFUSED
from deltaserve.server.vllm_compat import ResponsesRequest as VllmResponsesRequest

NOT_STORED = ("responses are not stored on this server (as `vllm serve` by default); send the whole "
              "conversation in `input`")
# What happens to each field of vLLM's ResponsesRequest (tests/test_server_http.py fails on a field no table names).
# Applied by the engine through vLLM's ``to_sampling_params``.
SAMPLING = frozenset({
    "temperature", "top_p", "top_k", "min_p", "max_output_tokens", "logit_bias", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "seed", "stop", "stop_token_ids", "ignore_eos", "skip_special_tokens",
    "include_stop_str_in_output", "structured_outputs", "text",
})
# Applied by deltaserve (prompt, routing, tools, the response).
SERVED = frozenset({"model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "stream",
                    "metadata", "request_id", "chat_template_kwargs"})
# Accepted and without effect here, as in ``vllm serve`` without the matching feature.
NO_EFFECT = {
    "store": "responses are not stored (as vllm serve by default): `store` is ignored",
    "user": "end-user id for abuse monitoring",
    "session_id": "affinity hint for routers in front of the server",
    "prompt_cache_key": "prefix caching is automatic",
    "service_tier": "one tier",
    "truncation": "a prompt longer than the context is a 400, never cut",
    "max_tool_calls": "one model turn per request: its calls are all the calls",
    "include_reasoning": "no reasoning parser: there is no reasoning to include",
    "mm_payload": "render endpoints only",
    "return_mm_kwargs": "render endpoints only",
}
# Refused with a 400 unless left at one of the listed values: the Responses API's own, and the chat's refusals of
# the fields the two requests share (server.protocol.generation).
SHARED = ("cache_salt", "kv_transfer_params", "ec_transfer_params", "vllm_xargs", "priority", "watermarking",
          "mm_processor_kwargs", "media_io_kwargs")
REFUSED: dict[str, tuple[str, tuple[Any, ...]]] = {
    "background": (f"background responses need a response store: {NOT_STORED}", (False, None)),
    "previous_response_id": (NOT_STORED, (None,)),
    "prompt": ("stored prompt templates are not served; send `instructions` and `input`", (None,)),
    "previous_input_messages": ("Harmony message history is for gpt-oss models, which are not served", (None,)),
    "enable_response_messages": ("raw Harmony messages are for gpt-oss models, which are not served", (False,)),
    "include": ("output logprobs and other `include` items are not returned; chat completions return logprobs",
                (None, [])),
    "top_logprobs": ("output logprobs are not returned; chat completions return logprobs", (0, None)),
    "reasoning": ("no reasoning parser is configured", (None,)),
    **{name: CHAT_REFUSED[name] for name in SHARED},
}


def field_policy(name: str) -> str:
    """``sampling`` / ``served`` / ``no_effect`` / ``refused`` for a Responses request field, else ``unknown``."""
    return policy_of(name, sampling=SAMPLING, served=SERVED, no_effect=NO_EFFECT, refused=REFUSED)

class ResponsesRequest(VllmSampling, VllmBody, VllmResponsesRequest):
    """vLLM's ``ResponsesRequest``; ``model`` is the base, an expert, a recipe expression or `auto`."""

    model_config = ConfigDict(extra="allow")
    model: str | None = Field(None, max_length=1000,
                              description="the base, an expert, a recipe expression, or `auto` (default: the base)")

    def refused(self) -> list[tuple[str, str]]:
        """(field, why) for every field set to something this server does not serve."""
        out = [(name, why) for name, (why, allowed) in REFUSED.items()
               if name in type(self).model_fields and getattr(self, name) not in allowed]
        if (self.model_extra or {}).get("conversation"):   # OpenAI's, not in vLLM's model
            out.append(("conversation", f"conversations need a response store: {NOT_STORED}"))
        builtin = sorted({getattr(t, "type", "?") for t in self.tools or [] if getattr(t, "type", None) != "function"})
        if builtin:
            out.append(("tools", f"built-in tools are not served ({', '.join(builtin)}); send function tools"))
        return out
