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

from deltaserve.server.protocol.common import VllmBody
from deltaserve.server.vllm_compat import ResponsesRequest as VllmResponsesRequest

NOT_STORED = ("responses are not stored on this server (as `vllm serve` by default); send the whole "
              "conversation in `input`")
# Refused with a 400 unless left at one of the listed values.
REFUSED: dict[str, tuple[str, tuple[Any, ...]]] = {
    "background": (f"background responses need a response store: {NOT_STORED}", (False, None)),
    "previous_response_id": (NOT_STORED, (None,)),
    "prompt": ("stored prompt templates are not served; send `instructions` and `input`", (None,)),
    "previous_input_messages": ("Harmony message history is for gpt-oss models, which are not served", (None,)),
    "enable_response_messages": ("raw Harmony messages are for gpt-oss models, which are not served", (False,)),
    "cache_salt": ("per-request prefix-cache salts are not served", (None,)),
    "kv_transfer_params": ("disaggregated serving is not configured", (None,)),
    "ec_transfer_params": ("disaggregated serving is not configured", (None,)),
    "vllm_xargs": ("no custom logits processors are installed to read vllm_xargs", (None,)),
    "priority": ("priority scheduling is not enabled; deltaserve schedules by recipe", (0,)),
    "watermarking": ("no watermark is configured on this server", (None, False)),
    "mm_processor_kwargs": ("the served models are text-only", (None,)),
    "media_io_kwargs": ("the served models are text-only", (None,)),
}


class ResponsesRequest(VllmBody, VllmResponsesRequest):
    """vLLM's ``ResponsesRequest``; ``model`` is the base, an expert, a recipe expression or `auto`."""

    model_config = ConfigDict(extra="allow")
    model: str | None = Field(None, max_length=1000,
                              description="the base, an expert, a recipe expression, or `auto` (default: the base)")

    def refused(self) -> list[tuple[str, str]]:
        """(field, why) for every field set to something this server does not serve."""
        out = [(name, why) for name, (why, allowed) in REFUSED.items()
               if name in type(self).model_fields and getattr(self, name) not in allowed]
        builtin = sorted({getattr(t, "type", "?") for t in self.tools or [] if getattr(t, "type", None) != "function"})
        if builtin:
            out.append(("tools", f"built-in tools are not served ({', '.join(builtin)}); send function tools"))
        return out
