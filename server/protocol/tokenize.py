"""vLLM's tokenizer endpoints (``/tokenize``, ``/detokenize``) and runtime-LoRA endpoints, in vLLM's shapes."""

from __future__ import annotations

from pydantic import Field

from deltaserve.server.protocol.common import VllmBody
from deltaserve.server.vllm_compat import (ChatCompletionMessageParam, DetokenizeRequest, LoadLoRAAdapterRequest,
                                           TokenizeChatRequest, TokenizeCompletionRequest, UnloadLoRAAdapterRequest)

class TokenizeCompletion(VllmBody, TokenizeCompletionRequest):
    """POST /tokenize with a ``prompt`` (vLLM's shape)."""


class TokenizeChat(VllmBody, TokenizeChatRequest):
    """POST /tokenize with ``messages`` (vLLM's shape)."""

    messages: list[ChatCompletionMessageParam] = Field(min_length=1)


class Detokenize(VllmBody, DetokenizeRequest):
    """POST /detokenize (vLLM's shape)."""

    tokens: list[int] = Field(max_length=1 << 20)


class LoadLoRAAdapter(VllmBody, LoadLoRAAdapterRequest):
    """POST /v1/load_lora_adapter (vLLM's shape): registers ``lora_path`` as the expert ``lora_name``."""

    lora_name: str = Field(min_length=1, max_length=64)
    lora_path: str = Field(min_length=1, max_length=4096, pattern=r"^[^\x00]*$")


class UnloadLoRAAdapter(VllmBody, UnloadLoRAAdapterRequest):
    """POST /v1/unload_lora_adapter (vLLM's shape): deletes the expert ``lora_name``."""

    lora_name: str = Field(min_length=1, max_length=64)
