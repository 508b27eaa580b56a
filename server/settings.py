"""Server settings: the engine, the router and the HTTP layer, each a validated pydantic model.

``deltaserve serve`` builds them from flags and environment (server.serve);
tests and embedders build them directly and pass them to ``create_app``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deltaserve.server.engine.adaptive import AdaptiveSettings


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base_dir: Path
    served_name: str = Field("base", description="the base model's name in the API")
    max_model_len: int = Field(256, ge=16)
    dtype: str = Field("auto", description="'auto': the checkpoint's dtype on GPU, float32 on CPU")
    gpu_memory_utilization: float = Field(0.3, gt=0.0, le=1.0)
    kv_cache_gib: int = Field(1, ge=1, description="vLLM-CPU KV cache GiB (VLLM_CPU_KVCACHE_SPACE) when unset")
    enable_lora: bool = Field(True, description="vLLM's LoRA kernels: low-rank recipes as batched adapters; "
                                                "without them every recipe is served from merged weights")
    max_lora_rank: int = Field(64, ge=1)
    max_loras: int = Field(4, ge=1, description="different LoRA recipes in one batch")
    adapter_cache_size: int = Field(32, ge=1, description="merged adapters kept (files + vLLM slots)")
    adapter_root: Path | None = None
    host_cache_bytes: int = Field(1 << 30, ge=0, description="decoded deltas kept in host RAM")
    max_wait_ms: float = Field(200.0, ge=0.0, description="dense path: longest a request waits for its recipe")
    enforce_eager: bool = True
    adaptive: AdaptiveSettings = Field(default_factory=AdaptiveSettings,
                                       description="serve a dominant LoRA recipe merged (server.adaptive)")
    seed: int = 0

    def vllm_dtype(self) -> str:
        """``auto`` is the checkpoint's dtype on a GPU, and float32 on a CPU: vLLM-CPU would pick bf16,
        which CPUs without native bf16 emulate slowly and which changes greedy answers (a float32
        SmolLM2 answered "L'Étoile, la Marseillaise" instead of "The capital of France is Paris")."""
        import torch

        return "float32" if self.dtype == "auto" and not torch.cuda.is_available() else self.dtype


class RouterSettings(BaseModel):
    """How `model: auto` is routed (router package); thresholds default to the calibrated ones."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field("none", description="'none' or a registered router (router.ROUTERS)")
    options: dict[str, Any] = Field(default_factory=dict, description="the router's options (e.g. k for knn)")
    encoder: Literal["minilm", "static"] = Field(
        "minilm", description="prompt features for knn/gate (router.features.ENCODERS): 'minilm' (all-MiniLM-L6-v2) "
                              "or 'static' (a token table distilled from it: ~20x cheaper at 32 concurrent requests, "
                              "weaker out-of-distribution fallback; router.static)")
    top_k: int = Field(1, ge=1, le=8)
    grid: float = Field(0.25, gt=0.0, le=1.0)
    min_confidence: float | None = Field(None, ge=0.0, le=1.0)
    max_distance: float | None = Field(None, ge=0.0)
    fallback: str = Field("", description="recipe served on fallback ('' = the base)")
    batch_window_ms: float = Field(2.0, ge=0.0, le=100.0,
                                   description="concurrent `auto` requests arriving within this window share one "
                                               "routing call (router.batcher); 0 routes each at once")

    @model_validator(mode="after")
    def _known_router(self) -> RouterSettings:
        if self.name != "none":
            from deltaserve.router import ROUTERS

            ROUTERS.parse_options(self.name, self.options)   # a miss lists the known routers
        return self


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    store_dir: Path
    engine: EngineConfig
    api_keys: list[str] = Field(default_factory=list)
    admin_keys: list[str] = Field(default_factory=list)
    register_roots: list[Path] = Field(default_factory=list, description="registration paths must lie under one")
    auto_recipe: str = Field("", description="what `auto` serves without a router ('' = the base)")
    store_poll_s: float = Field(2.0, gt=0.0)
    router: RouterSettings = Field(default_factory=RouterSettings)
    max_request_bytes: int = Field(4 << 20, ge=1024, description="larger request bodies get a 413")
    ops_need_key: bool = Field(False, description="/metrics, /docs and /openapi.json need an inference key too")

    @model_validator(mode="after")
    def _router_needs_lora(self) -> ServerSettings:
        if self.router.name == "uncertainty" and not self.engine.enable_lora:
            raise ValueError("the uncertainty router scores experts through LoRA adapters: it needs the engine's "
                             "LoRA support (--lora on)")
        return self

    @field_validator("api_keys", "admin_keys")
    @classmethod
    def _non_empty_keys(cls, keys: list[str]) -> list[str]:
        if any(not k.strip() for k in keys):
            raise ValueError("API keys must be non-empty")
        return keys
