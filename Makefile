# `make train` and `make test` work on a fresh clone: both install into .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install train test lint bench clean gpu-check gpu-wheels

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

train: install
	$(PY) train.py $(ARGS)

# Two workers (the CI machine's 2 cores), a test file per worker at a time so module fixtures are
# built once; ARGS=-n0 runs in one process.
test: install lint
	$(PY) -m pytest -q -n 2 --dist loadfile $(ARGS)

# ruff (lint and format, configured in pyproject.toml) and mypy over src/: `make test` runs them first.
lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

bench: install
	$(PY) bench/train_step.py

# On a GPU machine without registry access: `make gpu-wheels` first where the registry is reachable,
# copy .gpu-wheels/ into the checkout there, then `make gpu-check PYTHON=python3` there. Writes $(GPU_OUT)/RESULTS-gpu.md; ARGS=--dry-run for a CPU run.
GPU_OUT ?= bench/gpu-out
gpu-check:
	PYTHON=$(if $(wildcard $(PY)),$(PY),$(PYTHON)) bash bench/gpu_check.sh $(GPU_OUT) $(ARGS)

# Pure-python or manylinux cp312 wheels of what msdetr imports and the GPU machine's image lacks.
# antlr4-python3-runtime 4.9.3 has only an sdist on PyPI: built into a pure-python wheel here.
GPU_WHEELS := .gpu-wheels
gpu-wheels:
	@mkdir -p $(GPU_WHEELS)
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
		-d $(GPU_WHEELS) hydra-core==1.3.2 'omegaconf>=2.3,<2.4' pycocotools==2.0.11 torchdata==0.11.0
	$(PYTHON) -m pip wheel -q --no-deps -w $(GPU_WHEELS) antlr4-python3-runtime==4.9.3
	@ls $(GPU_WHEELS)

clean:
	rm -rf outputs multirun lightning_logs .pytest_cache
