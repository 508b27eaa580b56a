"""Serving: tokens/s and latency of traffic mixes through one server (``traffic``)."""
