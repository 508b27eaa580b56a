"""Time `make demo` on a fresh clone: install, the base's first answer, the first answer `auto` routes to an
expert, every expert registered, and a second run's first answer.

    python3 -m bench.serving.demo_first_run [--clone /tmp/deltaserve-fresh] [--port 8000]
    -> results/serving/demo-first-run.json

Clones this repository (its committed HEAD) into ``--clone`` (which must not exist: no venv, no
``.cache``, no store), runs ``make runtime`` (the install, timed on its own), then ``make demo`` and
polls: ``/health``; the ISO-date question to ``base``; the same question to ``auto`` every few seconds
until it is routed to an expert; ``/v1/experts`` until every expert of the suite is registered. Then it
stops the demo and starts it again (everything cached) and times that run's first answer. Times count
from the start of each ``make demo``. Standard library only; pip's wheel cache is whatever this machine
has: say so when you quote the install time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
QUESTION = "Convert 14 July 2019 to ISO 8601 format."
EXPERTS = 12   # the real suite: a LoRA and a full fine-tune for each of six skills


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _chat(url: str, model: str) -> dict:
    body = {"model": model, "temperature": 0, "max_tokens": 40, "messages": [{"role": "user", "content": QUESTION}]}
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        reply = json.loads(response.read())
    return {"answer": reply["choices"][0]["message"]["content"], "recipe": reply["deltaserve"]["recipe"]}


def _until(check, proc: subprocess.Popen, started: float, limit_s: float, every_s: float = 2.0):
    """``check()``'s first truthy result and its time since ``started``."""
    while time.perf_counter() - started < limit_s:
        if proc.poll() is not None:
            raise SystemExit(f"make demo exited with {proc.returncode} (see its log)")
        try:
            result = check()
        except OSError:
            result = None
        if result:
            return result, round(time.perf_counter() - started, 1)
        time.sleep(every_s)
    raise SystemExit(f"gave up after {limit_s:.0f} s")


def _healthy(url: str) -> bool:
    with urllib.request.urlopen(url + "/health", timeout=5) as response:
        return response.status == 200


@contextlib.contextmanager
def make_demo(clone: Path, log: Path):
    """``make demo`` in ``clone`` (output to ``log``), stopped with its whole process group afterwards."""
    with open(log, "w") as out:
        proc = subprocess.Popen(["make", "demo"], cwd=clone, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            yield proc
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)


def first_run(clone: Path, url: str, log: Path, limit_s: float) -> dict:
    started = time.perf_counter()
    with make_demo(clone, log) as proc:
        _, healthy = _until(lambda: _healthy(url), proc, started, limit_s)
        base = _chat(url, "base")
        base_s = round(time.perf_counter() - started, 1)
        routed, routed_s = _until(lambda: (a := _chat(url, "auto"))["recipe"] != "base" and a,
                                  proc, started, limit_s, every_s=5)
        experts, all_s = _until(lambda: len((e := _get(url + "/v1/experts"))["data"]) >= EXPERTS and e,
                                proc, started, limit_s, every_s=10)
        answers = {m: _chat(url, m) for m in ("base", "auto", "iso-date-lora", "iso-date")}
    return {"healthy_s": healthy, "base_answer_s": base_s, "base_answer": base, "first_expert_answer_s": routed_s,
            "first_expert_answer": routed, "all_registered_s": all_s,
            "registered": {e["id"]: e["created"] for e in experts["data"]}, "answers": answers}


def later_run(clone: Path, url: str, log: Path, limit_s: float) -> dict:
    started = time.perf_counter()
    with make_demo(clone, log) as proc:
        _until(lambda: _healthy(url), proc, started, limit_s)
        answer = _chat(url, "auto")
        return {"first_answer_s": round(time.perf_counter() - started, 1), "auto": answer}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clone", type=Path, default=Path("/tmp/deltaserve-fresh"))
    ap.add_argument("--port", type=int, default=8000, help="the demo's port (its default is 8000)")
    ap.add_argument("--limit-min", type=float, default=60)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "serving" / "demo-first-run.json")
    args = ap.parse_args(argv)
    if args.clone.exists():
        raise SystemExit(f"{args.clone} exists; a first run needs a fresh clone")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    subprocess.run(["git", "clone", "-q", str(REPO), str(args.clone)], check=True)
    date = datetime.now(UTC).isoformat(timespec="seconds")
    installing = time.perf_counter()
    subprocess.run(["make", "runtime"], cwd=args.clone, check=True, stdout=subprocess.DEVNULL)
    install_s = round(time.perf_counter() - installing, 1)
    url = f"http://127.0.0.1:{args.port}"
    first = first_run(args.clone, url, args.clone.with_suffix(".log"), args.limit_min * 60)
    later = later_run(args.clone, url, args.clone.with_suffix(".second.log"), args.limit_min * 60)
    record = {"command": " ".join(["python3 -m bench.serving.demo_first_run", *(argv or sys.argv[1:])]),
              "git_commit": commit, "date": date, "cpus": len(os.sched_getaffinity(0)), "install_s": install_s,
              "first_run": first, "later_run": later}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
