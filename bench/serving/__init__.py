"""Serving: tokens/s and latency of traffic mixes through one server (``traffic``), the same on a GPU
(``gpu``, ``gpu.sh``), and ``make demo`` timed on a fresh clone (``demo_first_run``)."""
