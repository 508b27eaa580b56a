"""Routing: fallback thresholds (``calibrate``), router accuracy and latency (``accuracy``),
accuracy end to end through the server (``e2e``)."""
