# Two commands: `make demo` and `make test`. Both set up .venv first (idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
DATA ?= data/object360
OUT ?= outputs
DEMO_STEPS ?= 600
DEMO_STYLE_STEPS ?= 900
METHOD ?= mm-nerf

# Passive OpenMP waiting keeps element-wise ops fast when another process shares the cores.
export OMP_WAIT_POLICY ?= PASSIVE
export PATH := $(BIN):$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: env demo test lint clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# CPU torch first: any later install that picks torch freely would pull a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/mmstyle-setup-env
	@touch $(STAMP)

env: $(STAMP)

demo: env
ifeq ($(METHOD),ed-nerf)
	$(BIN)/mmstyle-demo --method ed-nerf --data data/toy --output-dir $(OUT)
else ifeq ($(METHOD),head-stylize)
	$(BIN)/mmstyle-demo --method head-stylize --data data/head --output-dir $(OUT)
else ifeq ($(METHOD),tunemv3d)
	$(BIN)/mmstyle-demo --method tunemv3d --output-dir $(OUT)
else
	$(BIN)/mmstyle-demo --data $(DATA) --output-dir $(OUT) --steps $(DEMO_STEPS) --stylization-steps $(DEMO_STYLE_STEPS)
endif

lint: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pyright

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(OUT) renders
