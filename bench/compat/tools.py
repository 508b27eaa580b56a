"""Tool calling and the Responses API side by side: deltaserve and ``vllm serve``, same weights, same requests.

    .venv/bin/python -m bench.compat.tools        # needs the real zoo (deltaserve zoo build --size real)
    -> results/compat/tools.json

Both servers run vLLM's hermes tool-call parser with auto tool choice and
arguments pinned to each tool's schema (``--tool-call-parser hermes
--enable-auto-tool-choice --tool-strict-level parameter``; deltaserve's
default level is ``parameter``, vLLM's ``auto``) on the real zoo's base
(SmolLM2-135M-Instruct) and its ``iso_date`` LoRA adapter
(``bench.compat.pair``), deltaserve with the knn router (the adapter
registered with the real suite's exemplars). For each model (the base, the
adapter, and deltaserve's `auto` against vLLM serving what `auto` routed the
probe to) and two probes (the adapter's own
skill, and a question it has no skill for), greedy, the same requests through
the same clients: the OpenAI SDK (chat with a named function and with
``required``, streamed and not; the Responses API with a named function,
streamed and not) and, on the skill probe, LangChain (``bind_tools`` with a
named tool, ``with_structured_output(method="function_calling")``) and the
OpenAI Agents SDK (its Responses-API model and its chat-completions model; a
named tool, then the tool-result turn, stopped at its first sentence). Each case records, per server, whether
the client worked, the tool calls (name, arguments) and the response's shape
(the field names of the message, tool call or output item); where the calls
differ, the step where the greedy outputs part with each side's top-2
logprobs there. The summary says whether every case had the same outcome on both
(the client worked on both or failed on both, with the same calls), how many
cases worked on each, and whether the shapes match.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from bench.common import REPO, log, provenance
from bench.compat.pair import vllm_and_deltaserve

OUT = REPO / "results" / "compat" / "tools.json"
TOOL_FLAGS = ("--tool-call-parser", "hermes", "--enable-auto-tool-choice", "--tool-strict-level", "parameter")
MAX_TOKENS = 128


@dataclass(frozen=True)
class Probe:
    """A question and the one function tool it is asked with."""

    question: str
    tool: str
    argument: str

    @property
    def schema(self) -> dict:
        return {"type": "object", "properties": {self.argument: {"type": "string", "maxLength": 12}},
                "required": [self.argument], "additionalProperties": False}

    @property
    def chat_tool(self) -> dict:
        return {"type": "function", "function": {"name": self.tool, "parameters": self.schema}}

    @property
    def responses_tool(self) -> dict:
        return {"type": "function", "name": self.tool, "parameters": self.schema}


# The LoRA's own skill (ISO dates) and a question it has no skill for: its arguments degenerate into near-ties.
PROBES = {"iso date": Probe("Convert 14 July 2019 to ISO 8601 format.", "to_iso_date", "date"),
          "largest digit": Probe("What is the largest digit in 3917?", "largest_digit", "digits")}
CLIENT_PROBE = PROBES["iso date"]


class ToIsoDate(BaseModel):
    """A date in ISO 8601 format."""

    date: str = Field(max_length=12)


def _shape(obj: Any) -> list[str]:
    data = obj.model_dump(exclude_none=True) if hasattr(obj, "model_dump") else dict(obj)
    return sorted(data)


def _chat_cases(url: str, model: str, probe: Probe) -> dict[str, Callable[[], dict]]:
    from openai import OpenAI

    sdk = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    named = {"type": "function", "function": {"name": probe.tool}}
    messages = [{"role": "user", "content": probe.question}]

    def chat(choice: Any) -> dict:
        r = sdk.chat.completions.create(model=model, messages=messages, tools=[probe.chat_tool], tool_choice=choice,
                                        temperature=0, max_tokens=MAX_TOKENS, logprobs=True, top_logprobs=2)
        c = r.choices[0]
        steps = [[t.token, *(round(x.logprob, 5) for x in t.top_logprobs)] for t in c.logprobs.content or []]
        return {"calls": [[t.function.name, json.loads(t.function.arguments)] for t in c.message.tool_calls or []],
                "finish_reason": c.finish_reason, "shape": _shape(c.message),
                "call_shape": _shape(c.message.tool_calls[0]) if c.message.tool_calls else [], "steps": steps}

    def chat_stream(choice: Any) -> dict:
        name, args, finish = None, "", None
        for chunk in sdk.chat.completions.create(model=model, messages=messages,
                                                 tools=[probe.chat_tool], tool_choice=choice, temperature=0,
                                                 max_tokens=MAX_TOKENS, stream=True):
            for c in chunk.choices:
                finish = c.finish_reason or finish
                for d in c.delta.tool_calls or []:
                    name = (d.function.name if d.function else None) or name
                    args += (d.function.arguments or "") if d.function else ""
        return {"calls": [[name, json.loads(args)]] if name else [], "finish_reason": finish}

    def responses(stream: bool) -> dict:
        kw = dict(model=model, input=probe.question, tools=[probe.responses_tool], max_output_tokens=MAX_TOKENS,
                  temperature=0, tool_choice={"type": "function", "name": probe.tool})
        if stream:
            events = list(sdk.responses.create(**kw, stream=True))
            r, kinds = events[-1].response, sorted({e.type for e in events})
        else:
            r, kinds = sdk.responses.create(**kw), []
        calls = [[o.name, json.loads(o.arguments)] for o in r.output if o.type == "function_call"]
        return {"calls": calls, "status": r.status, "shape": _shape(r.output[0]) if r.output else [],
                "events": kinds}

    return {"chat named": lambda: chat(named), "chat required": lambda: chat("required"),
            "chat named stream": lambda: chat_stream(named), "chat required stream": lambda: chat_stream("required"),
            "responses named": lambda: responses(False), "responses named stream": lambda: responses(True)}


def _client_cases(url: str, model: str) -> dict[str, Callable[[], dict]]:
    def langchain_bind() -> dict:
        from langchain_openai import ChatOpenAI

        llm = ChatOpenAI(model=model, base_url=url + "/v1", api_key="unused", temperature=0, max_tokens=MAX_TOKENS)
        question = CLIENT_PROBE.question
        calls = llm.bind_tools([ToIsoDate], tool_choice="ToIsoDate").invoke(question).tool_calls
        parsed = llm.with_structured_output(ToIsoDate, method="function_calling").invoke(question)
        return {"calls": [[c["name"], c["args"]] for c in calls], "structured": parsed.model_dump()}

    def agents(kind: str) -> dict:
        from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner,
                            function_tool, set_tracing_disabled)
        from openai import AsyncOpenAI

        set_tracing_disabled(True)
        seen: list[str] = []

        @function_tool
        def to_iso_date(date: str) -> str:
            """A date in ISO 8601 format."""
            seen.append(date)
            return f"The ISO date is {date}."

        async def run() -> Any:
            # one client per event loop; the answer stops at its first sentence (vLLM's `stop`), so that a 135M
            # model's text turn ends within the 256-token context instead of as an incomplete response
            cls = OpenAIResponsesModel if kind == "responses" else OpenAIChatCompletionsModel
            client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            settings = ModelSettings(tool_choice="to_iso_date", temperature=0, max_tokens=MAX_TOKENS,
                                     extra_body={"stop": [". ", "\n\n"]})
            agent = Agent(name="dates", instructions="Answer with the tool's help.", tools=[to_iso_date],
                          model=cls(model=model, openai_client=client), model_settings=settings)
            async with client:
                return await Runner.run(agent, CLIENT_PROBE.question, max_turns=3)

        result = asyncio.run(run())
        return {"calls": [["to_iso_date", {"date": d}] for d in seen], "requests": len(result.raw_responses),
                "final_output": str(result.final_output)[:120]}

    return {"langchain bind_tools + function_calling": langchain_bind,
            "agents sdk (responses model)": lambda: agents("responses"),
            "agents sdk (chat model)": lambda: agents("chat")}


def _run(case: Callable[[], dict]) -> dict:
    try:
        return {"ok": True, **case()}
    except Exception as err:  # noqa: BLE001 - recorded: the client failed against this server
        return {"ok": False, "error": f"{type(err).__name__}: {err}"[:300]}


def _exemplars(task: str) -> list[str]:
    """The router's exemplars for the task's LoRA: the real suite's calibration questions, as the demo's."""
    from deltaserve_zoo.real.skills import get_skill

    return [e.question for e in get_skill(task).examples("calib", 8, seed=1)]


def _routed(url: str, probe: Probe) -> str:
    """The model vLLM serves to compare with deltaserve's `auto` on ``probe``: the expert `auto` routes it to
    (a LoRA adapter of the same name on vLLM), or the base."""
    import httpx

    r = httpx.post(url + "/v1/route", json={"messages": [{"role": "user", "content": probe.question}]}, timeout=60)
    r.raise_for_status()
    weights = r.json()["weights"]
    if not weights:
        return "base"
    (name, weight), = weights.items()
    if weight != 1.0:
        raise SystemExit(f"`auto` routed {probe.question!r} to a blend {weights}, which vLLM cannot serve")
    return name


def _divergence(ds: dict, vl: dict) -> dict | None:
    """Where two greedy outputs part: the step, each side's token and its top-2 logprobs there."""
    for i, (a, b) in enumerate(zip(ds.get("steps", []), vl.get("steps", []), strict=False)):
        if a[0] != b[0]:
            return {"step": i, "deltaserve": a, "vllm": b}
    return None


def _compare(model: str, probe: str, name: str, got: dict) -> dict:
    ds, vl = got["deltaserve"], got["vllm"]
    row = {"model": model, "probe": probe, "case": name, **got, "calls_equal": ds.get("calls") == vl.get("calls"),
           "shape_equal": all(ds.get(k) == vl.get(k) for k in ("shape", "call_shape", "events")),
           "divergence": _divergence(ds, vl)}
    for side in (ds, vl):
        side.pop("steps", None)
    log(f"{model:16s} {probe:14s} {name:40s} ok {ds['ok']!s:5s}/{vl['ok']!s:5s} calls equal "
        f"{row['calls_equal']!s:5s} shape equal {row['shape_equal']}")
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", type=Path, default=REPO / ".cache" / "zoo" / "real")
    ap.add_argument("--task", default="iso_date", help="the zoo task whose LoRA adapter is served too")
    ap.add_argument("--work", type=Path, default=None, help="default: .cache/bench/compat-tools-<zoo folder name>")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    work = args.work or REPO / ".cache" / "bench" / f"compat-tools-{args.zoo.name}"
    shutil.rmtree(work / "store", ignore_errors=True)   # registered afresh, with the router's exemplars
    rows = []
    with vllm_and_deltaserve(args.zoo, [args.task], work, extra=TOOL_FLAGS, ds_extra=("--router", "knn"),
                             lora_exemplars=_exemplars) as servers:
        for model in ["base", *servers.loras, "auto"]:
            for probe_name, probe in PROBES.items():
                served = _routed(servers.deltaserve, probe) if model == "auto" else model
                cases = {side: {**_chat_cases(url, name, probe),
                                **(_client_cases(url, name) if probe is CLIENT_PROBE else {})}
                         for side, url, name in (("deltaserve", servers.deltaserve, model),
                                                 ("vllm", servers.vllm, served))}
                for name in cases["vllm"]:
                    row = _compare(model, probe_name, name, {s: _run(c[name]) for s, c in cases.items()})
                    rows.append({**row, "vllm_model": served})
    result = {"provenance": provenance(argv=argv),
              "setup": {"flags_both": list(TOOL_FLAGS), "max_tokens": MAX_TOKENS,
                        "probes": {k: {"question": p.question, "tool": p.tool, "schema": p.schema}
                                   for k, p in PROBES.items()}},
              "all_same_outcome": all(r["deltaserve"]["ok"] == r["vllm"]["ok"] and r["calls_equal"] for r in rows),
              "cases_ok": {side: sum(r[side]["ok"] for r in rows) for side in ("deltaserve", "vllm")},
              "cases": len(rows),
              "all_calls_equal": all(r["calls_equal"] for r in rows),
              "all_shapes_equal": all(r["shape_equal"] for r in rows), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.out}: same outcome {result['all_same_outcome']}, cases ok {result['cases_ok']} of "
        f"{len(rows)}, calls equal "
        f"{result['all_calls_equal']}, shapes equal {result['all_shapes_equal']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
