# Two commands take a fresh machine with only Python to a running project:
#   make demo   set up .venv and run the main job: train a float digits CNN (the teacher), then compress it
#               with every callback in one LightningCLI YAML and print the AccelerationReport
#   make test   set up .venv with the dev tools, then lint (ruff, mypy) and run the test suite
# TORCH is installed first so that a CPU wheel (or a CUDA one, by override) is chosen by you,
# not by the resolver:  make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
DEMO_CONFIG ?= examples/configs/digits_pipeline.yaml
TEACHER ?= lightning_logs/digits_teacher/teacher.ckpt
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

$(TEACHER): | $(VENV)/.demo
	$(PY) examples/train.py fit --config examples/configs/digits_cnn.yaml \
		--trainer.enable_model_summary=false --trainer.callbacks+=ModelCheckpoint \
		--trainer.callbacks.dirpath=$(dir $(TEACHER)) --trainer.callbacks.filename=$(basename $(notdir $(TEACHER)))

demo: $(VENV)/.demo $(TEACHER)
	$(PY) examples/train.py fit --config $(DEMO_CONFIG)

lint: $(VENV)/.test
	$(PY) -m ruff check lightning_accel tests examples benchmarks
	$(PY) -m mypy

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.test
	$(PY) -m benchmarks --list

clean:
	rm -rf $(VENV) lightning_logs .pytest_cache benchmarks/results
