"""Every request body's base and the shapes every endpoint shares (errors, timestamps)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection
from typing import Any

from pydantic import BaseModel, model_validator

from deltaserve.server.exceptions import InvalidRequest, from_vllm
from deltaserve.server.vllm_compat import VLLMValidationError

MAX_TEXT_DEPTH = 64


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


class Body(BaseModel):
    """Base of every request body: strings must be valid Unicode."""

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        _check_utf8(data)
        return data


# Fields vLLM's own "before" validators read as containers: a wrong shape must be a 400, not their TypeError.
CONTAINER_FIELDS: dict[str, type | tuple[type, ...]] = {
    "messages": list, "tools": list, "structured_outputs": dict, "response_format": dict, "stream_options": dict,
    "kv_transfer_params": dict, "ec_transfer_params": dict, "chat_template_kwargs": dict, "tool_choice": (str, dict)}


class VllmBody(Body):
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
                    raise InvalidRequest(f"invalid request: `{name}` must be {shape}", name)
        try:
            return handler(data)
        except VLLMValidationError as err:
            raise from_vllm(err) from None
        except (TypeError, AttributeError, KeyError, IndexError) as err:   # vLLM's validators on odd shapes
            raise InvalidRequest(f"invalid request: {err}") from None


def policy_of(name: str, **tables: Collection[str]) -> str:
    """The name of the first of ``tables`` (policy -> field names) that holds ``name``, else ``unknown``."""
    return next((policy for policy, names in tables.items() if name in names), "unknown")


class VllmSampling:
    """For vLLM request models: ``sampling`` builds vLLM's ``SamplingParams``, its checks becoming 400s."""

    def sampling(self, max_tokens: int, defaults: dict[str, Any]) -> Any:
        """vLLM's ``SamplingParams`` for this request; vLLM's checks become 400s naming the parameter."""
        try:
            return self.to_sampling_params(max_tokens, defaults)  # type: ignore[attr-defined]
        except VLLMValidationError as err:
            raise from_vllm(err) from None
        except (ValueError, TypeError) as err:
            raise InvalidRequest(f"invalid sampling parameters: {err}", "sampling") from None


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
