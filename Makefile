# distnn: `make run` trains, `make test` tests. Each target installs what it needs into .venv.
#
# torch is pinned to the CPU wheel that lies on this project's machines (TORCH=... overrides,
# e.g. TORCH=torch for the newest CUDA build on a GPU machine). An unpinned torch would pull a
# CUDA build of several GB into every fresh install.

SHELL := /bin/bash
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
NPROC ?= 4
ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-cpu test-gpu gpu-check lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,dev]'
	touch $(STAMP)

# 4 ranks on the GPUs when there are at least 4, else on the CPU over gloo (device auto).
run: $(STAMP)
	$(BIN)/torchrun --nproc_per_node=$(NPROC) -m distnn.train $(ARGS)

# All tests; the CUDA ones skip cleanly on a machine without a GPU.
test: $(STAMP)
	$(BIN)/python -m pytest -q

# The whole suite forced onto the CPU (gloo), as on a machine with no GPU.
test-cpu: $(STAMP)
	CUDA_VISIBLE_DEVICES= $(BIN)/python -m pytest -q

# Only the tests that need CUDA (they fail, not skip, when CUDA is missing).
test-gpu: $(STAMP)
	DISTNN_REQUIRE_GPU=1 $(BIN)/python -m pytest -q -m gpu

# On a GPU machine whose $(PYTHON) already has torch, accelerate, safetensors and pytest (no
# venv, nothing installed): the CUDA tests, then the benchmark. Logs and bench files go to OUT.
# Made for a lent machine's one short call (under 9 minutes): the benchmark runs even when a
# test fails; the tests are cut off after GPU_TEST_LIMIT seconds; the benchmark starts no
# round past BENCH_BUDGET seconds and is cut off (a hang) after BENCH_LIMIT; the target fails
# if either part did.
OUT ?= gpu-results
BENCH_ARGS ?=
GPU_TEST_LIMIT ?= 200
BENCH_BUDGET ?= 200
BENCH_LIMIT ?= 320
gpu-check:
	mkdir -p $(OUT)
	set -o pipefail; failed=0; \
	DISTNN_REQUIRE_GPU=1 PYTHONPATH=. PYTHONUNBUFFERED=1 timeout $(GPU_TEST_LIMIT) \
	  $(PYTHON) -m pytest -v --durations=0 -m gpu tests/test_gpu.py 2>&1 | tee $(OUT)/test-gpu.log || failed=1; \
	PYTHONPATH=. PYTHONUNBUFFERED=1 timeout $(BENCH_LIMIT) $(PYTHON) -m distnn.bench \
	  --out $(OUT) --budget-s $(BENCH_BUDGET) $(BENCH_ARGS) 2>&1 | tee $(OUT)/bench.log \
	  || failed=1; \
	exit $$failed

# distnn against the reference loop, DDP and Accelerate; results in bench-results/.
bench: $(STAMP)
	$(BIN)/python -m distnn.bench --out bench-results

lint: $(STAMP)
	$(BIN)/ruff check distnn tests

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
