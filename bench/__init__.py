"""Benchmarks; each script runs as ``python -m bench.<concern>.<script>`` from the repo root.

- ``bench.common``: provenance of every results file, store seeding, traffic to a live server, copy bandwidth
- ``bench.servers``: start/stop a real ``deltaserve serve`` subprocess
- ``bench.quality``: compression / interpolation / merging tables (real suite and toy suites), NPS search timing
- ``bench.routing``: threshold calibration, router accuracy and latency, routing under concurrency, routing end
  to end through the server
- ``bench.serving``: throughput and latency of traffic mixes through the server
- ``bench.kernels``: the dense path's decode-and-add kernels against copy bandwidth, the sparse codecs, LoRA ops
- ``bench.compat``: third-party clients (vLLM bench, lm-eval, OpenAI SDK, LangChain) against deltaserve and vLLM
- ``bench.reliability``: the soak test
"""
