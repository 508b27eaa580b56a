"""What crosses the engine -> vLLM worker boundary (``collective_rpc``), as typed, frozen models.

The engine sends ``MergeRequest.model_dump()`` (plain data, as the RPC
serialises it) and the worker validates it back with ``MergeRequest.model_validate``;
the worker answers with a ``SwapStats`` dump. Both ends share these classes, so
a field cannot be added on one side and forgotten on the other.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class MergeItem(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    path: str = Field(description="the expert's directory")
    token: str = Field(description="cache key; changes whenever the expert's content does")
    weight: float


class MergeRequest(BaseModel):
    """Make the weights ``base + merge(items)``; no items restores the base."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    key: str = Field("", description="the recipe key (for logs and stats)")
    items: tuple[MergeItem, ...] = ()
    method: str = "task_arithmetic"
    options: dict[str, Any] = Field(default_factory=dict, description="the merge method's options")


class SwapStats(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    key: str
    mode: Literal["in_place", "reload"] = Field("reload", description="how the weights were written "
                                                                     "(server.worker.loading)")
    seconds: float
    bytes: int
    params: int
    host_hits: int
    host_misses: int
    host_evictions: int
    host_bytes: int
    phases: dict[str, float] = {}   # seconds of the worker's parts of the swap: decode, merge, load, retie
