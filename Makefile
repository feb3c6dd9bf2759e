# Two commands take a fresh machine with only Python to a running project:
#   make demo   set up .venv and run the main job (the digits pipeline through LightningCLI)
#   make test   set up .venv with the dev tools, then lint and run the test suite
# TORCH is installed first so that a CPU wheel (or a CUDA one, by override) is chosen by you,
# not by the resolver:  make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
DEMO_CONFIG ?= examples/configs/demo.yaml
PYTEST_ARGS ?=

.PHONY: demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(PY)
	$(PIP) install -q $(TORCH)
	touch $@

$(VENV)/.demo: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e ".[cli,examples]"
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.demo
	$(PIP) install -q -e ".[cli,examples,dev]"
	touch $@

demo: $(VENV)/.demo
	$(PY) examples/train.py fit --config $(DEMO_CONFIG)

lint: $(VENV)/.test
	$(PY) -m ruff check lightning_accel tests examples benchmarks

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.test
	$(PY) -m benchmarks --list

clean:
	rm -rf $(VENV) lightning_logs .pytest_cache benchmarks/results
