"""``deltaserve serve``: settings from flags/env, then uvicorn (``demo`` reuses it, server.commands.demo)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

DEFAULT_PORT = 8000
SHUTDOWN_GRACE_S = 30


def add_serve_arguments(p: argparse.ArgumentParser, *, demo: bool = False) -> None:
    if not demo:
        p.add_argument("--base", type=Path, required=True, help="base HF model directory")
        p.add_argument("--store", type=Path, required=True, help="expert store directory (created if missing)")
    else:
        p.add_argument("--store", type=Path, default=Path("store/demo"), help="expert store to fill and serve")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--api-key", action="append", default=None,
                   help="inference key (repeatable; env DELTASERVE_API_KEY, comma-separated)")
    p.add_argument("--admin-key", action="append", default=None,
                   help="key for expert registration/deletion (env DELTASERVE_ADMIN_KEY)")
    p.add_argument("--register-root", type=Path, action="append", default=None,
                   help="directories POST /v1/experts may read from (repeatable)")
    p.add_argument("--cache-bytes", type=int, default=1 << 30, help="host RAM for decoded deltas")
    p.add_argument("--max-wait-ms", type=float, default=200.0,
                   help="dense path: longest a request waits while another recipe is served")
    from deltaserve.router import ENCODERS, ROUTERS

    p.add_argument("--router", choices=["none", *sorted(ROUTERS)], default="knn" if demo else "none",
                   help="what `model: auto` uses")
    p.add_argument("--router-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a router option, e.g. k=5 for knn (repeatable; `deltaserve methods` lists them)")
    p.add_argument("--router-encoder", choices=list(ENCODERS), default="minilm",
                   help="knn/gate prompt features: minilm (all-MiniLM-L6-v2) or static (a token table distilled "
                        "from it, cached on first start: far cheaper under concurrency, weaker OOD fallback)")
    p.add_argument("--top-k", type=int, default=1, help="experts per routed recipe (weights on a 0.25 grid)")
    p.add_argument("--min-confidence", type=float, help="route to the fallback below this confidence")
    p.add_argument("--max-distance", type=float, help="knn/gate: fallback beyond this exemplar distance")
    p.add_argument("--route-batch-window-ms", type=float, default=2.0,
                   help="concurrent `auto` requests arriving within this window share one routing call")
    p.add_argument("--fallback", default="", help="recipe served on fallback (default: the base)")
    p.add_argument("--auto-recipe", default="", help="recipe for `auto` without a router (default: the base)")
    p.add_argument("--served-name", default="base", help="the base model's name in the API")
    p.add_argument("--max-model-len", type=int, default=256)
    p.add_argument("--max-lora-rank", default="auto",
                   help="LoRA slot rank: 'auto' sizes it from the store's LoRA experts (room for recipes of two of "
                        "the largest), or one of vLLM's 8, 16, 32, 64, 128, 256, 320, 512; vLLM-CPU pads every "
                        "adapter to it, so smaller is faster")
    p.add_argument("--max-loras", type=int, default=4)
    p.add_argument("--lora", choices=["on", "off"], default="on",
                   help="vLLM's LoRA support: on serves low-rank recipes as batched adapters; off starts vLLM without "
                        "it and serves every recipe from merged weights (the dense path); the uncertainty router "
                        "needs it on")
    p.add_argument("--adaptive-merge", choices=["on", "off"], default="on",
                   help="serve a LoRA recipe that dominates the traffic from merged weights (base speed), "
                        "unmerge when traffic mixes (server.adaptive; README 'Adaptive merge')")
    p.add_argument("--adaptive-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an adaptive-policy setting, e.g. window_s=10, enter_share=0.9, min_requests=8 (repeatable)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    p.add_argument("--kv-cache-gib", type=int, default=1, help="vLLM-CPU KV cache size (GiB)")
    p.add_argument("--dtype", default="auto", help="weights dtype; auto: the checkpoint's on GPU, float32 on CPU")
    p.add_argument("--store-poll-s", type=float, default=2.0, help="how often to look for other replicas' changes")
    p.add_argument("--adapter-cache-size", type=int, default=32,
                   help="merged LoRA adapters kept (adapters in use are never evicted)")
    p.add_argument("--max-request-bytes", type=int, default=4 << 20, help="larger request bodies get a 413")
    p.add_argument("--ops-need-key", action="store_true",
                   help="require an inference key for /metrics, /docs and /openapi.json too (default: open, "
                        "so Prometheus and people can read them; /health is always open)")
    p.add_argument("--log-level", default="info")


def _keys(flag: list[str] | None, env: str) -> list[str]:
    keys = list(flag or [])
    keys += [k.strip() for k in os.environ.get(env, "").split(",") if k.strip()]
    return keys


def _router_options(items: list[str], flag: str = "--router-option") -> dict[str, str]:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"error: {flag} {item!r} must be KEY=VALUE")
        options[key.strip()] = value.strip()
    return options


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank(flag: str, store_dir: Path) -> int:
    """``--max-lora-rank``: a supported rank, or for 'auto' the smallest one that holds a recipe of two of the
    store's largest LoRA experts (8 with no LoRA experts)."""
    if flag != "auto":
        if not flag.isdigit() or int(flag) not in VLLM_LORA_RANKS:
            raise SystemExit(f"error: --max-lora-rank must be 'auto' or one of {list(VLLM_LORA_RANKS)}, got {flag!r}")
        return int(flag)
    ranks = []
    for manifest in Path(store_dir).glob("*/manifest.json"):
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        if data.get("codec") == "lowrank" and isinstance(data.get("rank"), int):
            ranks.append(data["rank"])
    need = 2 * max(ranks, default=4)
    return next((r for r in VLLM_LORA_RANKS if r >= need), VLLM_LORA_RANKS[-1])


def adaptive_settings(args: argparse.Namespace):
    from pydantic import ValidationError

    from deltaserve.server.engine.adaptive import AdaptiveSettings

    try:
        return AdaptiveSettings(**_router_options(args.adaptive_option, "--adaptive-option"),
                                enabled=args.adaptive_merge == "on")
    except ValidationError as err:
        e = err.errors()[0]
        raise SystemExit(f"error: --adaptive-option {'.'.join(map(str, e['loc']))}: {e['msg']} "
                         f"(settings: {', '.join(AdaptiveSettings.model_fields)})") from None


def settings_from_args(args: argparse.Namespace, base: Path):
    from pydantic import ValidationError

    from deltaserve.server.settings import EngineConfig, RouterSettings, ServerSettings

    engine = EngineConfig(
        base_dir=base, served_name=args.served_name, max_model_len=args.max_model_len, dtype=args.dtype,
        gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_gib=args.kv_cache_gib,
        max_lora_rank=lora_rank(str(args.max_lora_rank), args.store), max_loras=args.max_loras,
        enable_lora=args.lora == "on",
        host_cache_bytes=args.cache_bytes, max_wait_ms=args.max_wait_ms, adapter_cache_size=args.adapter_cache_size,
        adaptive=adaptive_settings(args))
    try:
        return ServerSettings(
            store_dir=args.store, engine=engine, api_keys=_keys(args.api_key, "DELTASERVE_API_KEY"),
            admin_keys=_keys(args.admin_key, "DELTASERVE_ADMIN_KEY"), register_roots=list(args.register_root or []),
            auto_recipe=args.auto_recipe, store_poll_s=args.store_poll_s,
            max_request_bytes=args.max_request_bytes, ops_need_key=args.ops_need_key,
            router=RouterSettings(name=args.router, options=_router_options(args.router_option),
                                  encoder=args.router_encoder, top_k=args.top_k,
                                  min_confidence=args.min_confidence, max_distance=args.max_distance,
                                  fallback=args.fallback, batch_window_ms=args.route_batch_window_ms))
    except ValidationError as err:
        raise SystemExit(f"error: {err.errors()[0]['msg']}") from None


def run(settings, host: str, port: int, log_level: str, banner: str = "") -> int:
    import uvicorn

    from deltaserve.server.app import create_app

    app = create_app(settings, on_ready=(lambda: print(banner, flush=True)) if banner else None)
    # SIGTERM: stop accepting, let in-flight requests finish for at most SHUTDOWN_GRACE_S, then exit.
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    return 0


def serve(args: argparse.Namespace) -> int:
    if not (args.base / "config.json").is_file():
        raise SystemExit(f"error: --base {args.base} is not an HF model directory (no config.json)")
    settings = settings_from_args(args, args.base)
    return run(settings, args.host, args.port, args.log_level)


def demo_banner(host: str, port: int, example_model: str, expert: str) -> str:
    url = f"http://{host}:{port}"
    body = json.dumps({"model": example_model, "messages": [{"role": "user", "content": "Upper-case the text lantern"}],
                       "max_tokens": 20})
    return f"""
deltaserve demo is up on {url}

  curl {url}/v1/models
  curl {url}/v1/chat/completions -H 'content-type: application/json' -d '{body}'
  curl {url}/v1/completions -H 'content-type: application/json' \\
       -d '{{"model": "0.5*{expert}+0.5*count-vowels-lora", "prompt": "Q: How many vowels are in banana?\\nA: ", "max_tokens": 8}}'

  python - <<'EOF'
from openai import OpenAI
client = OpenAI(base_url="{url}/v1", api_key="unused")
r = client.chat.completions.create(model="auto", messages=[{{"role": "user", "content": "What is the largest digit in 3917?"}}])
print(r.choices[0].message.content, r.model_extra["deltaserve"]["recipe"])
EOF
"""
