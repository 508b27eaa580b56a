"""``deltaserve demo``: the real suite served as a chat model, its experts arriving live.

Serves SmolLM2-135M-Instruct (converted from the GGUF on PyPI) as soon as the base is ready, and beside
the server trains the real suite's experts — per skill a PEFT LoRA and a full fine-tune — registering
each through the server's own admin API the moment it is trained (zoo.real.live): ``/v1/models`` and
``auto`` grow while the user watches. Experts already in the store are served at once (a second run
answers within a minute). ``--no-serve`` builds every expert and publishes them into the store
without a server (benchmarks); ``--suite toy`` serves the tests' toy zoo instead. Like the other zoo
commands (zoo, eval), this is product code that uses the zoo: only these three do.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

from deltaserve.server.commands import serve as serve_command
from deltaserve.server.commands._shared import DEFAULT_ZOO_ROOT

HELP = "serve SmolLM2-135M-Instruct at once and train its skill experts beside it, each registered live"
REAL_ROOT = Path(".cache/zoo/real")
DEMO_MAX_MODEL_LEN = 512
# Questions whose answers differ between the base, the expert and `auto`.
BANNER_QUESTIONS = {"iso_date": "Convert 14 July 2019 to ISO 8601 format.",
                    "sql": "Write a SQL query that selects the name of every user whose age is over 30."}


def add_arguments(p: argparse.ArgumentParser) -> None:
    # the demo serves tool calls as the docs' examples make them: vLLM's hermes parser, auto tool choice on
    serve_command.add_arguments(p, defaults={("store_dir",): Path("store/demo"), ("router", "name"): "knn",
                                             ("tools", "tool_call_parser"): "hermes",
                                             ("tools", "enable_auto_tool_choice"): True},
                                exclude=(("engine", "base_dir"),))
    p.add_argument("--suite", choices=["real", "toy"], default="real",
                   help="real: SmolLM2-135M-Instruct and its skills; toy: the tests' tiny zoo")
    p.add_argument("--size", default="demo", help="toy zoo size (with --suite toy)")
    p.add_argument("--no-serve", action="store_true", help="build every expert, publish them into the store and "
                                                           "exit")


def quiet() -> None:
    """The demo's log is for people: vLLM logs its errors only (``VLLM_LOGGING_LEVEL``); no deprecation or
    future warnings from the libraries, here or in vLLM's processes (they inherit the environment); none of
    vLLM's notes on what it deprecates in the way the engine calls it (work for the next vLLM upgrade,
    server/vllm_compat.py, not for a demo's user); not the multiprocessing resource tracker's note when the
    demo stops its trainings."""
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning,"
                                            "ignore::UserWarning:multiprocessing.resource_tracker")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")   # vLLM's start-up chatter; set it to INFO to see it
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    logging.getLogger("vllm.v1.engine.input_processor").addFilter(
        lambda record: "deprecated" not in record.getMessage())


def run(args: argparse.Namespace) -> int:
    quiet()
    if args.suite == "toy":
        return toy_demo(args)
    from deltaserve_zoo.real.build import RealSuiteBuilder

    builder = RealSuiteBuilder(REAL_ROOT)
    builder.build_base()
    settings = serve_command.settings(args, engine__base_dir=builder.layout.base)
    engine = settings.engine.model_copy(update={"max_model_len": max(settings.engine.max_model_len,
                                                                      DEMO_MAX_MODEL_LEN)})
    settings = settings.model_copy(update={"engine": engine,
                                           "register_roots": [*settings.register_roots, REAL_ROOT / "experts"]})
    if args.no_serve:
        from deltaserve_zoo.real.live import publish_all

        builder.build_experts()
        publish_all(builder, settings.store_dir)
        return 0
    publisher = start_publisher(settings)
    try:
        return serve_command.serve(settings, banner(settings.host, settings.port), access_log=False)
    finally:
        stop_publisher(publisher)


def local_url(host: str, port: int) -> str:
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"


def start_publisher(settings: Any) -> Any:
    """The live publisher (zoo.real.live) in its own process group, beside the server."""
    ctx = multiprocessing.get_context("spawn")
    process = ctx.Process(target=_publish, name="deltaserve-demo-experts",
                          args=(str(REAL_ROOT), local_url(settings.host, settings.port),
                                settings.admin_keys[0] if settings.admin_keys else None, os.getpid()))
    process.start()
    return process


def stop_publisher(process: Any) -> None:
    """Stop the publisher and the trainings it runs (its process group)."""
    if process.is_alive() and process.pid is not None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    process.join(10)


def _publish(root: str, url: str, admin_key: str | None, demo_pid: int) -> None:
    os.setpgrp()    # the trainings it spawns share its group: stopped together
    _exit_with(demo_pid)
    quiet()
    from deltaserve_zoo.real.live import LivePublisher

    try:
        LivePublisher(Path(root), url, admin_key, log=lambda line: print(line, flush=True)).run()
    except Exception as err:  # noqa: BLE001 - the server keeps serving what it has; say why no more arrive
        print(f"experts: stopped: {err}", file=sys.stderr, flush=True)


def _exit_with(pid: int, interval_s: float = 1.0) -> None:
    """End this process group when process ``pid`` is gone: the demo may not get to stop the publisher
    (uvicorn ends its process with the signal that stopped it, and kill -9 runs no code at all)."""
    import threading
    import time

    from deltaserve.experts.atomic import pid_alive

    def watch() -> None:
        while pid_alive(pid):
            time.sleep(interval_s)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    threading.Thread(target=watch, name="deltaserve-demo-watch", daemon=True).start()


def banner(host: str, port: int) -> str:
    from deltaserve_zoo.real.live import expert_names

    url = local_url(host, port)
    question = BANNER_QUESTIONS["iso_date"]
    lora, full = expert_names("iso_date")

    def chat(model: str, text: str) -> str:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 40,
                           "temperature": 0})
        return f"  curl -s {url}/v1/chat/completions -H 'content-type: application/json' -d '{body}'"

    return f"""
deltaserve demo is up on {url}: SmolLM2-135M-Instruct. Its skill experts are trained beside it and
appear in /v1/models as each is registered (the log says when): {lora} first, then {full}, then
the other skills'. `auto` routes to the experts registered so far and falls back to the base.

  curl {url}/v1/experts
{chat("base", question)}
{chat(lora, question)}
{chat("auto", question)}
{chat("auto", BANNER_QUESTIONS["sql"])}
{chat(f"ties(density=0.3):{full}+sql", question)}

  python - <<'EOF'
from openai import OpenAI
client = OpenAI(base_url="{url}/v1", api_key="unused")
for model in ("base", "auto"):
    r = client.chat.completions.create(model=model, temperature=0,
        messages=[{{"role": "user", "content": "{question}"}}])
    print(model, "->", r.choices[0].message.content, r.model_extra["deltaserve"]["recipe"])
EOF
"""


# On the demo zoo NPS keeps ~60 % of the experts' accuracy at density 0.05 and far more at 0.2
# (results/quality/toy/README.md); the demo serves the denser, still ~3x smaller-than-fp16, experts.
DEMO_NPS_DENSITY = 0.2


def seed_demo_store(zoo_root: Path, store_dir: Path, *, density: float = DEMO_NPS_DENSITY, nps_generations: int = 6,
                    calib_n: int = 48) -> Path:
    """Publish the zoo's experts: full fine-tunes NPS-compressed, LoRAs kept exact with exemplars."""
    from deltaserve.experts.calibration import delta_objective
    from deltaserve.experts.examples import ChatExample
    from deltaserve.experts.sources import Compression
    from deltaserve.experts.store import ExpertStore
    from deltaserve_zoo.build import ZooLayout
    from deltaserve_zoo.spec import ZooSpec
    from deltaserve_zoo.tasks import get_task

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
            calib = [ChatExample.of(e.question, e.answer) for e in get_task(task).examples("calib", calib_n)]
            store.import_source(name, layout.full(task), objective=delta_objective(layout.base, calib),
                                compression=Compression(method="nps", density=density, task=task,
                                                        generations=nps_generations))
            print(f"published {name} (NPS, density {density})", flush=True)
    return layout.base


def toy_demo(args: argparse.Namespace) -> int:
    """``deltaserve demo --suite toy``: the toy zoo (the tests' fixture) served with its experts."""
    from deltaserve_zoo.build import ZooBuilder
    from deltaserve_zoo.spec import preset

    zoo_root = DEFAULT_ZOO_ROOT / args.size
    ZooBuilder(preset(args.size), zoo_root).build(workers=2)
    settings = serve_command.settings(args, engine__base_dir=zoo_root / "base")
    base = seed_demo_store(zoo_root, settings.store_dir)
    if args.no_serve:
        return 0
    example = "auto" if settings.router.name != "none" else "upper"
    print(f"starting the engine (base {base}, store {settings.store_dir}) ...", file=sys.stderr, flush=True)
    return serve_command.serve(settings, toy_banner(settings.host, settings.port, example, "upper-lora"))


def toy_banner(host: str, port: int, example_model: str, expert: str) -> str:
    url = local_url(host, port)
    body = json.dumps({"model": example_model, "max_tokens": 20,
                       "messages": [{"role": "user", "content": "Upper-case the text lantern"}]})
    recipe = f"0.5*{expert}+0.5*count-vowels-lora"
    return f"""
deltaserve demo is up on {url}

  curl {url}/v1/models
  curl {url}/v1/chat/completions -H 'content-type: application/json' -d '{body}'
  curl {url}/v1/completions -H 'content-type: application/json' \\
       -d '{{"model": "{recipe}", "prompt": "Q: How many vowels are in banana?\\nA: ", "max_tokens": 8}}'

  python - <<'EOF'
from openai import OpenAI
client = OpenAI(base_url="{url}/v1", api_key="unused")
r = client.chat.completions.create(model="auto",
    messages=[{{"role": "user", "content": "What is the largest digit in 3917?"}}])
print(r.choices[0].message.content, r.model_extra["deltaserve"]["recipe"])
EOF
"""
