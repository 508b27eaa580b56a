"""Structured output through third-party clients on the real base (SmolLM2-135M-Instruct, ChatML).

    .venv/bin/python -m bench.compat.structured        # needs .cache/zoo/real/base (deltaserve zoo build --size real)
    -> results/compat/structured.json

Against a ``deltaserve serve`` on the real base: the OpenAI SDK's
``chat.completions.parse(response_format=<pydantic model>)`` and LangChain's
``ChatOpenAI.with_structured_output(<pydantic model>)`` (JSON schema) must
return schema-valid objects; ``json_object`` must return a JSON object; every
response and stream chunk must validate strictly as the OpenAI SDK's types;
on this server, started without ``--tool-call-parser``, ``bind_tools`` must be
refused with a 400 that says which flags tool calling needs (tool calls with a
parser: ``bench.compat.tools``). Each case records its output and latency.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pydantic import BaseModel, Field

from bench.common import REPO, log, provenance
from deltaserve.server.launch import ServerProcess

OUT = REPO / "results" / "compat" / "structured.json"
REAL_BASE = REPO / ".cache" / "zoo" / "real" / "base"
MAX_TOKENS = 128


class City(BaseModel):
    """What the structured-output cases ask for (bounded, so a looping small model still terminates)."""

    name: str = Field(max_length=40, description="the city's name")
    country: str = Field(max_length=40)
    population_millions: int = Field(ge=0, le=100)


def openai_cases(url: str, key: str) -> list[dict]:
    from openai import OpenAI
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    client = OpenAI(base_url=url + "/v1", api_key=key)
    cases = []
    for city in ("Paris", "Tokyo", "Nairobi"):
        start = time.perf_counter()
        try:
            r = client.chat.completions.parse(
                model="base", response_format=City, max_tokens=MAX_TOKENS, temperature=0,
                messages=[{"role": "user", "content": f"Describe {city} as JSON: name, country, population in "
                                                      "millions."}])
            valid, output = isinstance(r.choices[0].message.parsed, City), r.choices[0].message.content
        except Exception as err:  # noqa: BLE001 - recorded as an invalid case
            valid, output = False, f"{type(err).__name__}: {err}"[:300]
        cases.append({"client": "openai.chat.completions.parse", "prompt_city": city, "valid": valid,
                      "output": output, "seconds": round(time.perf_counter() - start, 2)})
    raw = client.chat.completions.with_raw_response.create(
        model="base", max_tokens=MAX_TOKENS, temperature=0, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": 'Reply with the JSON object {"ok": true} and nothing else.'}])
    body = json.loads(raw.text)
    ChatCompletion.model_validate(body, strict=True)
    content = body["choices"][0]["message"]["content"]
    try:
        is_object = isinstance(json.loads(content), dict)
    except json.JSONDecodeError:
        is_object = False
    cases.append({"client": "openai json_object", "valid": is_object, "output": content,
                  "finish_reason": body["choices"][0]["finish_reason"], "strict_openai_types": True})
    import httpx

    sse = httpx.post(url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=120,
                     json={"model": "base", "max_tokens": 16, "temperature": 0, "stream": True,
                           "stream_options": {"include_usage": True},
                           "messages": [{"role": "user", "content": "Say hello."}]}).text
    chunks = [ChatCompletionChunk.model_validate(json.loads(line[6:]), strict=True)
              for line in sse.splitlines() if line.startswith("data: {")]
    cases.append({"client": "openai stream", "valid": bool(chunks) and chunks[-1].usage is not None,
                  "chunks": len(chunks), "strict_openai_types": True})
    return cases


def langchain_cases(url: str, key: str) -> list[dict]:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="base", base_url=url + "/v1", api_key=key, temperature=0, max_tokens=MAX_TOKENS)
    cases = []
    for city in ("Lisbon", "Ottawa", "Tokyo"):
        start = time.perf_counter()
        try:
            out = llm.with_structured_output(City).invoke(f"Describe {city}: name, country and population in "
                                                          "millions.")
            valid, output = isinstance(out, City), out.model_dump() if isinstance(out, City) else str(out)
        except Exception as err:  # noqa: BLE001 - recorded as an invalid case
            valid, output = False, f"{type(err).__name__}: {err}"[:300]
        cases.append({"client": "langchain with_structured_output (json_schema)", "prompt_city": city,
                      "valid": valid, "output": output, "seconds": round(time.perf_counter() - start, 2)})
    try:
        llm.bind_tools([City]).invoke("Describe Rome.")
        refused = {"status": 200, "message": None}
    except Exception as err:  # noqa: BLE001 - the client's error type is what we record
        refused = {"status": getattr(err, "status_code", None), "message": str(err)[:300]}
    cases.append({"client": "langchain bind_tools", "valid": refused["status"] == 400, **refused})
    return cases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, default=REAL_BASE)
    ap.add_argument("--work", type=Path, default=REPO / ".cache" / "bench" / "compat-structured")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if not (args.base / "config.json").is_file():
        raise SystemExit(f"error: no model at {args.base}; build it with `deltaserve zoo build --size real`")
    args.work.mkdir(parents=True, exist_ok=True)
    key = "bench-key"
    log(f"starting deltaserve on {args.base}")
    server = ServerProcess(args.base, args.work / "store", args.work / "server.log",
                           ["--log-level", "warning", "--max-model-len", "1024", "--api-key", key])
    try:
        cases = openai_cases(server.url, key) + langchain_cases(server.url, key)
    finally:
        server.stop()
    for case in cases:
        log(f"{case['client']:48s} valid={case['valid']}  {json.dumps(case.get('output'))[:80]}")
    result = {"provenance": provenance(argv=argv), "base": str(args.base.relative_to(REPO))
              if args.base.is_relative_to(REPO) else str(args.base),
              "all_valid": all(c["valid"] for c in cases), "cases": cases}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.out}: all valid: {result['all_valid']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
