"""Routing: fallback thresholds (``calibrate``), router accuracy and latency (``accuracy``), encoder
precision and batch cost (``encoder_options``), routing under concurrency (``concurrency``), and the real
suite's accuracy end to end through the server (``real_e2e``)."""
