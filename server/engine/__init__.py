"""The engine: one vLLM ``AsyncLLM`` with the base resident, and everything between a planned request and it.

``core`` (lifecycle, the store scan, generation), ``planner`` (how a recipe is served: pure),
``lora`` and ``adapters`` (the LoRA path), ``swap`` (the dense path's weight swap),
``scheduler`` (admission by weight state), ``adaptive`` (serving a dominant LoRA recipe merged),
``scoring`` (uncertainty scoring), ``contracts`` (what crosses to the worker, server.worker),
``supervisor`` (restarts), ``types`` (what the engine and the HTTP layer agree on).
"""
