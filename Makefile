# megastack: two commands do all the set-up on a fresh machine:
#   make demo   installs into .venv, prepares the default model and runs the main job
#   make test   installs what is missing and runs the whole suite
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
MEGASTACK := $(VENV)/bin/megastack
PYTEST_ARGS ?=
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup protos model up down status demo test test-unit test-integration test-e2e bench megatron-env lint gpu-check gpu-wheels clean help

help:
	@echo "make demo | test | setup | up | down | status | protos | bench | lint | gpu-check | gpu-wheels | clean"

setup:
	@tools/setup.sh

protos:
	@$(PY) tools/gen_protos.py

model: setup

# make up [PROMETHEUS=1] [UP_ARGS="--replicas 2 ..."]
up: setup
	@$(MEGASTACK) up $(if $(PROMETHEUS),--prometheus) $(UP_ARGS)

down:
	@if [ -x $(MEGASTACK) ]; then $(MEGASTACK) down; else echo "nothing to stop (.venv missing)"; fi

status:
	@$(MEGASTACK) status

demo: setup
	@$(MEGASTACK) demo

test: setup
	@$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup
	@$(PY) -m pytest -m unit $(PYTEST_ARGS)

test-integration: setup
	@$(PY) -m pytest -m integration $(PYTEST_ARGS)

test-e2e: setup
	@$(PY) -m pytest -m e2e $(PYTEST_ARGS)

# make bench [BENCH="textgen preprocess"] [MEGATRON_LM=DIR]: writes bench-results/ and docs/benchmarks.md;
# MEGATRON_LM (a Megatron-LM checkout) adds its own tools/preprocess_data.py to the preprocess bench
bench: setup
	@MEGATRON_LM=$(MEGATRON_LM) $(PY) tools/bench/run_all.py $(BENCH)

# the venv beside the project that runs Megatron-LM's preprocess_data.py offline (the bench makes it too)
megatron-env:
	@tools/bench/megatron_env.sh $(MEGATRON_LM)

# tools/gpu_check.py: the GPU code paths in one run (here on the CPU; on a GPU machine see docs/gpu.md)
gpu-check: setup
	@$(PY) tools/gpu_check.py $(GPU_CHECK_ARGS)

# the wheels gpu_check needs on a GPU machine that lacks them, into .whl/ (git-ignored)
gpu-wheels: setup
	@tools/gpu_wheels.sh

lint: setup
	@$(VENV)/bin/ruff format --check --quiet protos shared llm services tools tests
	@$(VENV)/bin/ruff check protos shared llm services tools tests
	@$(PY) tools/check_imports.py
	@$(PY) tools/check_rules.py
	@$(PY) tools/check_devices.py
	@$(PY) tools/check_docstrings.py
	@$(VENV)/bin/mypy shared llm services/*/wire.py services/*/config.py

clean: down
	rm -rf .run bench-results .pytest_cache .venv-megatron
