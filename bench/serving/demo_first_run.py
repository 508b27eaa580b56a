"""Time `make demo` on a fresh clone to its first served chat answer.

    python3 -m bench.serving.demo_first_run [--clone /tmp/deltaserve-fresh] [--port 8000]
    -> results/serving/demo-first-run.json

Clones this repository (its committed HEAD) into ``--clone`` (which must not
exist: no venv, no ``.cache``, no store), runs ``make demo`` there and polls
``/health``; then asks the banner's ISO-date question of ``auto``, ``base``,
``iso-date-lora`` and ``iso-date`` and records when the first answer came back,
the phase times the build wrote (``.cache/zoo/real/build-times.json``) and the
answers. Runs with the standard library only, so it can time the install too.
pip's wheel cache is whatever this machine has; say so when you quote it.
"""

from __future__ import annotations

import argparse
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
MODELS = ("auto", "base", "iso-date-lora", "iso-date")


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def wait_healthy(proc: subprocess.Popen, url: str, started: float, limit_s: float) -> float:
    while time.perf_counter() - started < limit_s:
        if _healthy(url):
            return time.perf_counter() - started
        if proc.poll() is not None:
            raise SystemExit(f"make demo exited with {proc.returncode} before serving (see its log)")
        time.sleep(2)
    raise SystemExit(f"not healthy after {limit_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clone", type=Path, default=Path("/tmp/deltaserve-fresh"))
    ap.add_argument("--port", type=int, default=8000, help="the demo's port (its default is 8000)")
    ap.add_argument("--limit-min", type=float, default=120)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "serving" / "demo-first-run.json")
    args = ap.parse_args(argv)
    if args.clone.exists():
        raise SystemExit(f"{args.clone} exists; a first run needs a fresh clone")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    subprocess.run(["git", "clone", "-q", str(REPO), str(args.clone)], check=True)
    url, log_path = f"http://127.0.0.1:{args.port}", args.clone.with_suffix(".log")
    started, wall_start = time.perf_counter(), time.time()
    date = datetime.now(UTC).isoformat(timespec="seconds")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["make", "demo"], cwd=args.clone, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            healthy = wait_healthy(proc, url, started, args.limit_min * 60)
            answers, first = {}, None
            for model in MODELS:
                reply = _post(url + "/v1/chat/completions", {"model": model, "temperature": 0, "max_tokens": 40,
                                                             "messages": [{"role": "user", "content": QUESTION}]})
                first = first if first is not None else time.perf_counter() - started
                answers[model] = {"answer": reply["choices"][0]["message"]["content"],
                                  "recipe": reply.get("deltaserve", {}).get("recipe")}
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
    runtime = args.clone / ".venv" / ".installed-runtime"
    phases = json.loads((args.clone / ".cache/zoo/real/build-times.json").read_text())
    record = {"command": " ".join(["python3 -m bench.serving.demo_first_run", *(argv or sys.argv[1:])]),
              "git_commit": commit, "date": date, "cpus": len(os.sched_getaffinity(0)),
              "install_s": round(runtime.stat().st_mtime - wall_start, 1),
              "suite_build_s": phases, "healthy_s": round(healthy, 1), "first_answer_s": round(first, 1),
              "question": QUESTION, "answers": answers}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
