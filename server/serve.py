"""``deltaserve serve`` and ``deltaserve demo``: settings from flags/env, then uvicorn."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_PORT = 8000
# On the demo zoo NPS keeps ~60 % of the experts' accuracy at density 0.05 and far more at 0.2
# (results/quality/README.md); the demo serves the denser, still ~3x smaller-than-fp16, experts.
DEMO_NPS_DENSITY = 0.2


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
    p.add_argument("--router", choices=["none", "knn", "gate", "uncertainty"], default="knn" if demo else "none",
                   help="what `model: auto` uses")
    p.add_argument("--top-k", type=int, default=1, help="experts per routed recipe (weights on a 0.25 grid)")
    p.add_argument("--min-confidence", type=float, help="route to the fallback below this confidence")
    p.add_argument("--max-distance", type=float, help="knn/gate: fallback beyond this exemplar distance")
    p.add_argument("--fallback", default="", help="recipe served on fallback (default: the base)")
    p.add_argument("--auto-recipe", default="", help="recipe for `auto` without a router (default: the base)")
    p.add_argument("--served-name", default="base", help="the base model's name in the API")
    p.add_argument("--max-model-len", type=int, default=256)
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--max-loras", type=int, default=4)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    p.add_argument("--kv-cache-gib", type=int, default=1, help="vLLM-CPU KV cache size (GiB)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--store-poll-s", type=float, default=2.0, help="how often to look for other replicas' changes")
    p.add_argument("--log-level", default="info")


def _keys(flag: list[str] | None, env: str) -> list[str]:
    keys = list(flag or [])
    keys += [k.strip() for k in os.environ.get(env, "").split(",") if k.strip()]
    return keys


def settings_from_args(args: argparse.Namespace, base: Path):
    from server.app import RouterSettings, ServerSettings
    from server.engine import EngineConfig

    engine = EngineConfig(
        base_dir=base, served_name=args.served_name, max_model_len=args.max_model_len, dtype=args.dtype,
        gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_gib=args.kv_cache_gib,
        max_lora_rank=args.max_lora_rank, max_loras=args.max_loras, host_cache_bytes=args.cache_bytes,
        max_wait_ms=args.max_wait_ms)
    return ServerSettings(
        store_dir=args.store, engine=engine, api_keys=_keys(args.api_key, "DELTASERVE_API_KEY"),
        admin_keys=_keys(args.admin_key, "DELTASERVE_ADMIN_KEY"), register_roots=list(args.register_root or []),
        auto_recipe=args.auto_recipe, store_poll_s=args.store_poll_s,
        router=RouterSettings(name=args.router, top_k=args.top_k, min_confidence=args.min_confidence,
                              max_distance=args.max_distance, fallback=args.fallback))


def run(settings, routing, host: str, port: int, log_level: str, banner: str = "") -> int:
    import uvicorn

    from server.app import create_app

    app = create_app(settings, routing=routing, on_ready=(lambda: print(banner, flush=True)) if banner else None)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
    return 0


def serve(args: argparse.Namespace) -> int:
    if not (args.base / "config.json").is_file():
        raise SystemExit(f"error: --base {args.base} is not an HF model directory (no config.json)")
    settings = settings_from_args(args, args.base)
    return run(settings, None, args.host, args.port, args.log_level)


# ---------------------------------------------------------------------------- demo


def seed_demo_store(zoo_root: Path, store_dir: Path, *, density: float = DEMO_NPS_DENSITY, nps_generations: int = 6,
                    calib_n: int = 48) -> Path:
    """Publish the zoo's experts: full fine-tunes NPS-compressed, LoRAs kept exact with exemplars."""
    from experts.store import Compression, ExpertStore
    from experts.zoo.build import ZooLayout, load_llama, load_tokenizer
    from experts.zoo.evaluate import TaskEvaluator, task_vector_objective
    from experts.zoo.spec import ZooSpec
    from experts.zoo.tasks import get_task

    spec = ZooSpec.model_validate_json((zoo_root / "spec.json").read_text())
    layout = ZooLayout(zoo_root)
    store = ExpertStore(store_dir, layout.base)
    have = set(store.names())
    for task in spec.tasks:
        name = task.replace("_", "-")
        exemplars = [e.question for e in get_task(task).examples("calib", 64, seed=1)]
        if f"{name}-lora" not in have:
            store.import_source(f"{name}-lora", layout.lora(task), exemplars=exemplars)
            print(f"published {name}-lora (LoRA, exact)", flush=True)
        if name not in have:
            evaluator = TaskEvaluator(load_tokenizer(layout.base), [task], "calib", calib_n)
            objective = task_vector_objective(load_llama(layout.base), evaluator, task)
            store.import_source(name, layout.full(task), objective=objective,
                                compression=Compression(method="nps", density=density, task=task,
                                                        generations=nps_generations))
            print(f"published {name} (NPS, density {density})", flush=True)
    return layout.base


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


def demo(args: argparse.Namespace) -> int:
    from experts.zoo.build import ZooBuilder
    from experts.zoo.spec import preset

    zoo_root = Path(".cache/zoo") / args.size
    ZooBuilder(preset(args.size), zoo_root).build(workers=2)
    base = seed_demo_store(zoo_root, args.store)
    if args.no_serve:
        return 0
    settings = settings_from_args(args, base)
    banner = demo_banner(args.host, args.port, "auto" if args.router != "none" else "upper", "upper-lora")
    print(f"starting the engine (base {base}, store {args.store}) ...", file=sys.stderr, flush=True)
    return run(settings, None, args.host, args.port, args.log_level, banner)
