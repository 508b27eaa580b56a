"""The HTTP API's wire format, as pydantic models only (the logic is in server.serving and server.service).

* ``common``: every body's base (valid Unicode; vLLM's validation errors become 400s naming their
  parameter), the error shape, timestamps;
* ``generation``: completions and chat completions — vLLM's own models, extended — and what happens
  to each of their fields;
* ``tokenize``: vLLM's tokenizer and runtime-LoRA endpoint bodies;
* ``admin``: deltaserve's own: models, experts, the routing dry run.
"""
