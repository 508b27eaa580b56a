"""Benchmarks and sweeps; each script runs as ``python -m bench.<concern>.<script>`` from the repo root.

- ``bench.common``: provenance of every results file, store seeding, traffic to a live server, copy bandwidth
- ``bench.servers``: start/stop a real ``deltaserve serve`` subprocess
- ``bench.quality``: compression / interpolation / merging tables, the NPS probes, the zoo recipe sweep
- ``bench.routing``: threshold calibration, router accuracy and latency, routing end to end through the server
- ``bench.serving``: throughput and latency of traffic mixes through the server
- ``bench.kernels``: the dense path's decode-and-add kernels against copy bandwidth
"""
