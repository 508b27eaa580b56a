"""Every model family vLLM serves, through the real engine, exact against HF transformers.

For each family: a tiny random checkpoint built from the family's own transformers config class, a random
PEFT LoRA of it and a random full fine-tune (deltaserve_zoo.families, cached). One server per family
registers both through the HTTP API (the LoRA kept exactly; the fine-tune's task vector magnitude-pruned to
half its entries) and answers greedily (temperature 0, ``TOKENS`` tokens, each prompt); every answer must be
HF transformers' greedy answer:

* base: HF on the base checkpoint;
* LoRA expert: HF on the base with the PEFT adapter merged (``merge_and_unload``), on the LoRA path where
  vLLM runs LoRA on the family, else on the dense path with the reason in the response;
* dense expert: HF on the checkpoint ``deltaserve merge`` writes for the stored (compressed) expert;
* router: ``model: auto`` (knn over the experts' exemplars) picks the expert whose exemplars the prompt
  echoes and answers as that expert.

Each expert must change at least one answer (otherwise the comparison could not fail). HF runs eager
attention: its SDPA path drops Gemma 2's attention logit soft-capping, which vLLM applies.

The support table of the docs (docs/families.md) is rendered from ``results/families.json``; this test
checks that file says what the run measured (``DELTASERVE_UPDATE_FAMILIES=1`` rewrites it). ``starcoder2``
is a family known only to this list (zoo.families does not name it): a family vLLM serves needs no product
change.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from deltaserve_zoo.families import FAMILIES, Family, Shape, random_checkpoint, random_finetune, random_lora
from tests.support import ADMIN_KEY, REPO

FAMILY_CASES: dict[str, Family] = {**FAMILIES, "starcoder2": Family("Starcoder2Config")}
PROMPTS = ["Hello there, how are you?", "What is 2+2?", "Name a colour."]
TOKENS = 12
CACHE = REPO / ".cache" / "zoo" / "families"
RESULTS = REPO / "results" / "families.json"
LORA_EXEMPLARS = ["please adapt me lightly", "a low-rank question", "adapter style prompt"]
DENSE_EXEMPLARS = ["dense fine-tune question", "the full model was tuned", "compressed task vector prompt"]
MEASURED: dict[str, dict] = {}


def artifacts(name: str) -> tuple[Path, Path, Path]:
    base = random_checkpoint(FAMILY_CASES[name], CACHE / name / "base")
    return base, random_lora(base, CACHE / name / "lora"), random_finetune(base, CACHE / name / "finetune")


def hf_answers(model, prompts: list[list[int]]) -> list[list[int]]:
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=TOKENS, do_sample=False, min_new_tokens=0,
                               eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in prompts]


def hf_load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def served(server, model: str, prompts: list[list[int]]) -> tuple[list[list[int]], dict]:
    """Greedy token ids of each prompt (``ignore_eos``, as HF with no end token) and the last ``deltaserve``."""
    out, meta = [], {}
    with server.client() as client:
        for p in prompts:
            r = client.post("/v1/completions", json={"model": model, "prompt": p, "max_tokens": TOKENS,
                                                     "temperature": 0, "ignore_eos": True, "logprobs": 0,
                                                     "return_tokens_as_token_ids": True})
            assert r.status_code == 200, r.text
            body = r.json()
            out.append([int(t.removeprefix("token_id:")) for t in body["choices"][0]["logprobs"]["tokens"]])
            meta = body["deltaserve"]
    return out, meta


def prompt_ids(base: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    return [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                    return_dict=True)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def family_servers(engines, tmp_path_factory, request):
    """``get(name)``: that family's server, started with the next collected family's already on its way up
    (the next one's imports overlap this one's requests); each stops when the next is asked for."""
    cases = [getattr(getattr(item, "callspec", None), "params", {}) for item in request.session.items
             if item.path.name == "test_families.py"]
    names = [params["name"] for params in cases if "name" in params]
    started: dict[str, object] = {}
    root = tmp_path_factory.mktemp("families")

    def start(name: str):
        base, _, _ = artifacts(name)
        store = root / name / "store"
        store.mkdir(parents=True)
        return engines.start(base, store, root / name / "server.log", extra=["--router", "knn"],
                             roots=(CACHE / name,), wait=False)

    def get(name: str):
        for other in [n for n in started if n != name]:
            started.pop(other).stop()
        if name not in started:
            started[name] = start(name)
        nxt = names.index(name) + 1
        if nxt < len(names) and names[nxt] not in started:
            artifacts(names[nxt])
            started[names[nxt]] = start(names[nxt])
        server = started[name]
        server.wait_healthy()
        return server

    yield get
    for server in started.values():
        server.stop()


@pytest.mark.parametrize("name", list(FAMILY_CASES))
def test_family_serves_base_lora_dense_and_merge_exactly(name, family_servers, tmp_path):
    from peft import PeftModel

    from deltaserve.experts.store import ExpertStore
    from deltaserve.server.cli import main as cli

    base, lora, finetune = artifacts(name)
    server = family_servers(name)
    with server.client(ADMIN_KEY) as client:
        for expert, source, extra, exemplars in [
                ("lora", lora, {}, LORA_EXEMPLARS),
                ("tuned", finetune, {"compression": {"method": "magnitude", "density": 0.5}}, DENSE_EXEMPLARS)]:
            r = client.post("/v1/experts", json={"name": expert, "path": str(source), "exemplars": exemplars,
                                                 **extra})
            assert r.status_code in (200, 201), r.text
    prompts = prompt_ids(base)
    health = server.client().get("/health").json()

    row: dict[str, str] = {"model": health["model"]}
    base_answers, _ = served(server, "base", prompts)
    assert base_answers == hf_answers(hf_load(base), prompts)
    row["base"] = "exact"

    lora_answers, meta = served(server, "lora", prompts)
    assert lora_answers == hf_answers(PeftModel.from_pretrained(hf_load(base), lora).merge_and_unload(), prompts)
    assert lora_answers != base_answers
    if health["lora"] == "on":
        assert meta["path"] == "lora", meta
        row["lora"] = "exact"
    else:
        assert meta["path"] == "dense" and meta["reason"] == health["lora"].removeprefix("off: "), meta
        row["lora"] = f"exact, on the dense path: {meta['reason']}"

    dense_answers, meta = served(server, "tuned", prompts)
    assert meta["path"] == "dense"
    merged = tmp_path / "merged"
    store = ExpertStore(server.store, base)
    assert cli(["merge", "--base", str(base), "--experts", str(store.path("tuned")), "--out", str(merged)]) == 0
    assert dense_answers == hf_answers(hf_load(merged), prompts)
    assert dense_answers != base_answers
    row["dense"] = row["merge"] = "exact"

    routed, meta = served(server, "auto", prompt_ids_for(base, LORA_EXEMPLARS[0]))
    assert meta["weights"] == {"lora": 1.0}, meta
    assert routed == served(server, "lora", prompt_ids_for(base, LORA_EXEMPLARS[0]))[0]
    row["router"] = "exact"

    again, _ = served(server, "base", prompts)
    assert again == base_answers     # the base comes back after the dense swap
    MEASURED[name] = row
    check_results(name, row)


def prompt_ids_for(base: Path, text: str) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    return [tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                    return_dict=True)["input_ids"]]


def check_results(name: str, row: dict) -> None:
    """``results/families.json`` (the docs' support table) holds what this run measured for ``name``."""
    recorded = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"families": {}}
    if os.environ.get("DELTASERVE_UPDATE_FAMILIES"):
        from bench.common import provenance

        recorded["families"] = {k: v for k, v in recorded["families"].items() if k in FAMILY_CASES}
        recorded["families"][name] = {"config": FAMILY_CASES[name].config, **row}
        recorded.update(provenance("DELTASERVE_UPDATE_FAMILIES=1 .venv/bin/python -m pytest tests/test_families.py"))
        RESULTS.write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n")
    assert recorded["families"].get(name) == {"config": FAMILY_CASES[name].config, **row}, (
        f"results/families.json does not say what {name} does now; rerun with DELTASERVE_UPDATE_FAMILIES=1")


# ---------------------------------------------------------------------------- experts that do not fit

# the micro zoo's base
MICRO = Shape(hidden=64, heads=2, kv_heads=2, head_dim=32, intermediate=128, vocab=260, tied=False)
MISFITS = {   # case: (family, shape, kind, what the refusal must say)
    "phi3-lora": ("phi3", MICRO, "lora", "first offending tensor 'model.layers.0.mlp.gate_up_proj.weight' adapts a "
                                         "weight the base does not have"),
    "wide-lora": ("llama", replace(MICRO, hidden=128), "lora", "first offending tensor 'model.layers.0.mlp.down_proj"
                                                                 ".weight': factors (128, 4)@(4, 128) do not fit"),
    "vocab-finetune": ("llama", replace(MICRO, vocab=300), "finetune",
                       "first offending tensor 'lm_head.weight' has shape (300, 64), the base's is (260, 64); "
                       "vocabulary size 300 vs the base's 260"),
    "qwen2-finetune": ("qwen2", MICRO, "finetune", "first offending tensor 'model.layers.0.self_attn.k_proj.bias' "
                                                   "is not in the base; model_type: base 'llama' vs 'qwen2'"),
}


def misfit(case: str) -> Path:
    family, shape, kind, _ = MISFITS[case]
    base = random_checkpoint(family, CACHE / "misfits" / case / "base", shape)
    make = random_lora if kind == "lora" else random_finetune
    return make(base, CACHE / "misfits" / case / kind)


@pytest.mark.parametrize("case", list(MISFITS))
def test_an_expert_that_does_not_fit_the_base_is_refused_naming_its_first_offending_tensor(case, live_server, tmp_path):
    """Another family, another width, another vocabulary: a 400 naming the tensor at registration (and the
    same line from ``deltaserve compress``), never a 500 at serve time or a partial merge."""
    import shutil

    from deltaserve.server.cli import main as cli

    source = live_server.store.parent / f"misfit-{case}"       # a registration root of the session server
    if not source.exists():
        shutil.copytree(misfit(case), source)
    with live_server.client(ADMIN_KEY) as client:
        r = client.post("/v1/experts", json={"name": f"misfit-{case}", "path": str(source)})
        assert r.status_code == 400, r.text
        assert MISFITS[case][3] in r.json()["error"]["message"], r.text
        assert client.get("/v1/models").status_code == 200
        assert f"misfit-{case}" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    kind = "--adapter" if MISFITS[case][2] == "lora" else "--finetuned"
    assert cli(["compress", "--base", str(live_server.base), kind, str(source), "--method", "dense",
                "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
