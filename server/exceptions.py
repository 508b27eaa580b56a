"""What can go wrong with a request, as domain errors that carry the offending parameter.

Validators, the service, serving and the engine raise these (as vLLM raises
``VLLMValidationError(parameter=...)``); server.errors maps each class to an
HTTP status once. They are not ``ValueError``s on purpose: raised inside a
pydantic validator, they pass through pydantic unchanged instead of being
re-wrapped as a ``ValidationError``.
"""

from __future__ import annotations

from typing import Any


class RequestError(Exception):
    """Something about one request that its client can act on; ``param`` names the field, if one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param

    def __str__(self) -> str:
        return self.message


class InvalidRequest(RequestError):
    """The request is malformed or asks for something not served (a 400)."""


def from_vllm(err: Any, prefix: str = "", param: str | None = None) -> InvalidRequest:
    """vLLM's own request check (``VLLMValidationError`` and the like) as an invalid request naming its
    parameter (``param`` when vLLM names none)."""
    message = str(err.args[0]) if err.args else str(err)
    return InvalidRequest(prefix + message, getattr(err, "parameter", None) or param)


class NotFound(RequestError):
    """What the request names does not exist here (a 404)."""


class Unauthenticated(RequestError):
    """No key, or an unknown one (a 401)."""


class Forbidden(RequestError):
    """The key or the server's configuration does not allow this (a 403)."""


class BodyTooLarge(RequestError):
    """The request body is larger than the server accepts (a 413)."""


class Unavailable(RequestError):
    """The request is fine but cannot be served now (a 503): retry, or ask for something else; ``retry_after``
    (seconds) becomes the response's ``Retry-After``."""

    def __init__(self, message: str, param: str | None = None, *, retry_after: float | None = None) -> None:
        super().__init__(message, param)
        self.retry_after = retry_after


class EngineUnavailable(Unavailable):
    """The engine is not running (starting, restarting or dead)."""


class ExpertUnavailable(Unavailable):
    """An expert the request needs is in the store but cannot be read or applied (corrupt data, a failed swap)."""


class RoutingUnavailable(Unavailable):
    """`auto` cannot be routed now (the router is overloaded, or chose what is no longer servable)."""
