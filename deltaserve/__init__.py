"""deltaserve: one resident base LLM, many compressed experts, per-request routing, vLLM underneath.

Layers, imports pointing down: :mod:`deltaserve.experts` (task vectors, codecs, merge methods, the
store) <- :mod:`deltaserve.router` (prompt features, routers, policy) <- :mod:`deltaserve.server` (the
OpenAI-compatible HTTP server, the engine on vLLM, the CLI). The repository keeps each layer in its
own top-level folder; ``pyproject.toml`` maps the folders into this namespace.
"""

__version__ = "0.1.0"
