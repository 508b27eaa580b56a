"""OpenAI-compatible wire format (the subset deltaserve serves), as pydantic models: requests and responses.

Field names, defaults and response shapes follow the OpenAI API (and vLLM's
own protocol models), so the official ``openai`` SDK works unchanged. Unknown
request fields are accepted and ignored, as OpenAI-compatible servers do,
except the ones that would change the output and that we do not implement:
those are rejected with a 400 instead of being silently dropped.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from experts.store import Compression

UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "best_of", "logit_bias", "tools", "tool_choice",
               "functions", "function_call", "response_format", "prompt_logprobs")


MAX_TEXT_DEPTH = 64
INT64 = 2**63


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


class _Request(_Body):
    model_config = ConfigDict(extra="allow")

    model: str = Field(max_length=1000)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    ignore_eos: bool = Field(False, description="vLLM extension: generate max_tokens even past EOS (benchmarks)")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def unsupported(self) -> list[str]:
        extra = self.model_extra or {}
        return sorted(k for k in UNSUPPORTED if extra.get(k) not in (None, False, 0, [], {}))

    def sampling(self, max_tokens: int) -> dict[str, Any]:
        return dict(n=self.n, max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                    seed=self.seed, stop=self.stop or None, presence_penalty=self.presence_penalty,
                    frequency_penalty=self.frequency_penalty, ignore_eos=self.ignore_eos)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        prompts = [value] if isinstance(value, str) else value
        if not prompts or len(prompts) > 64:
            raise ValueError("prompt must be a string or a list of 1-64 strings")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


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


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)

    def plain_messages(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


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


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ServedAs(BaseModel):
    """The ``deltaserve`` field of a non-streaming response: what the request was served with."""

    recipe: str
    path: Literal["base", "lora", "dense"]
    weights: dict[str, float]
    method: str
    options: dict[str, Any] = Field(default_factory=dict)
    route: dict[str, Any] | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    deltaserve: ServedAs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    deltaserve: ServedAs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "deltaserve"
    root: str | None = None
    parent: str | None = None
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
