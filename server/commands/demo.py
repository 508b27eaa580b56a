"""``deltaserve demo``: the real suite served as a chat model with routed experts.

Builds (or reuses) the real suite — SmolLM2-135M-Instruct from the GGUF on
PyPI, a full fine-tune and a PEFT LoRA per skill (zoo.real) — publishes every
expert into a store with exemplars for the router and a measured quality
(teacher-forced score on the skill's calibration split), and serves it with the
knn router. LoRAs are kept exact; full fine-tunes are compressed with
``DEMO_COMPRESSION``. ``--suite toy`` serves the toy test zoo instead.
Like the other server.commands, this is product code that uses the zoo: only the
zoo, eval and demo commands do.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from deltaserve.server.commands import serve as serve_command
from deltaserve.server.commands._shared import DEFAULT_ZOO_ROOT

HELP = ("build the real suite (SmolLM2-135M-Instruct + skill experts), publish its experts into a store and serve "
        "them with routing")
REAL_ROOT = Path(".cache/zoo/real")
EXEMPLARS_PER_SKILL = 48
CALIBRATION_PER_SKILL = 64
DEMO_MAX_MODEL_LEN = 512
# The compressor and density the real-suite quality tables justify (README "Quality"; results/real_quality).
DEMO_COMPRESSION = {"method": "dare", "density": 0.01}
# Questions whose answers differ between the base, the expert and `auto` (checked when the demo starts).
BANNER_QUESTIONS = {"iso_date": "Convert 14 July 2019 to ISO 8601 format.",
                    "sql": "Write a SQL query that selects the name of every user whose age is over 30."}


def expert_names(skill: str) -> tuple[str, str]:
    """(LoRA expert, compressed full fine-tune) store names of a skill."""
    name = skill.replace("_", "-")
    return f"{name}-lora", name


def seed_real_store(builder, store_dir: Path, log=print) -> Path:
    """Publish the suite's experts (skipping those already in the store); returns the base directory."""
    from deltaserve.experts.calibration import DeltaObjective, TeacherForcedScorer
    from deltaserve.experts.hfmodel import load_causal_lm, load_tokenizer
    from deltaserve.experts.sources import Compression
    from deltaserve.experts.store import ExpertStore
    from deltaserve_zoo.real.skills import get_skill

    layout = builder.layout
    store = ExpertStore(store_dir, layout.base)
    have = set(store.names())
    model, tokenizer = None, load_tokenizer(layout.base)
    for skill_name in builder.spec.skills:
        skill = get_skill(skill_name)
        lora, full = expert_names(skill_name)
        if {lora, full} <= have:
            continue
        model = model if model is not None else load_causal_lm(layout.base)
        exemplars = [e.question for e in skill.examples("calib", EXEMPLARS_PER_SKILL, seed=1)]
        objective = DeltaObjective(model, TeacherForcedScorer(tokenizer, skill.examples("calib",
                                                                                        CALIBRATION_PER_SKILL)))
        if lora not in have:
            m = store.import_source(lora, layout.lora(skill_name), exemplars=exemplars, objective=objective)
            log(f"published {lora} (LoRA, exact; calibration {m.calibration_score:.3f})")
        if full not in have:
            m = store.import_source(full, layout.full(skill_name), exemplars=exemplars, objective=objective,
                                    compression=Compression(task=skill_name, **DEMO_COMPRESSION))
            log(f"published {full} ({m.codec}, {m.bits_per_param:.2f} bits/param; "
                f"calibration {m.calibration_score:.3f})")
    return layout.base


def add_arguments(p: argparse.ArgumentParser) -> None:
    serve_command.add_arguments(p, defaults={("store_dir",): Path("store/demo"), ("router", "name"): "knn"},
                                exclude=(("engine", "base_dir"),))
    p.add_argument("--suite", choices=["real", "toy"], default="real",
                   help="real: SmolLM2-135M-Instruct and its skills; toy: the tests' tiny zoo")
    p.add_argument("--size", default="demo", help="toy zoo size (with --suite toy)")
    p.add_argument("--no-serve", action="store_true", help="prepare the store and exit")


def run(args: argparse.Namespace) -> int:
    if args.suite == "toy":
        return toy_demo(args)
    from deltaserve_zoo.real.build import RealSuiteBuilder

    started = time.perf_counter()
    builder = RealSuiteBuilder(REAL_ROOT)
    for matrix in builder.build(workers=2):
        matrix.print(title="real suite: test-split accuracy through vLLM")
    settings = serve_command.settings(args, engine__base_dir=REAL_ROOT / "base")
    if settings.engine.max_model_len < DEMO_MAX_MODEL_LEN:
        settings.engine.max_model_len = DEMO_MAX_MODEL_LEN
    base = seed_real_store(builder, settings.store_dir)
    print(f"real suite and store ready in {time.perf_counter() - started:.0f} s", flush=True)
    if args.no_serve:
        return 0
    print(f"starting the engine (base {base}, store {settings.store_dir}) ...", file=sys.stderr, flush=True)
    return serve_command.serve(settings, banner(settings.host, settings.port))


def banner(host: str, port: int) -> str:
    url = f"http://{host}:{port}"
    question = BANNER_QUESTIONS["iso_date"]
    lora, full = expert_names("iso_date")

    def chat(model: str, text: str) -> str:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 40,
                           "temperature": 0})
        return f"  curl -s {url}/v1/chat/completions -H 'content-type: application/json' -d '{body}'"

    return f"""
deltaserve demo is up on {url}: SmolLM2-135M-Instruct with routed experts

  curl {url}/v1/models
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
# (results/quality/README.md); the demo serves the denser, still ~3x smaller-than-fp16, experts.
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
