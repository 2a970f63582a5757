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

.PHONY: install run test test-cpu test-gpu gpu-check gpu-lm lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,dev]'
	touch $(STAMP)

# 4 ranks on the GPUs when there are at least 4, else on the CPU over gloo (device auto).
run: $(STAMP)
	$(BIN)/torchrun --nproc_per_node=$(NPROC) -m distnn.train $(ARGS)

# All tests; the CUDA ones skip cleanly on a machine without a GPU. TEST_WORKERS tests run
# at a time (pytest-xdist): many wait (for a timeout, a peer, a launcher) with the CPU idle.
# (TEST_WORKERS=0: one at a time.)
TEST_WORKERS ?= 2
PYTEST = $(BIN)/python -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS))
test: $(STAMP)
	$(PYTEST)

# The whole suite forced onto the CPU (gloo), as on a machine with no GPU.
test-cpu: $(STAMP)
	CUDA_VISIBLE_DEVICES= $(PYTEST)

# Only the tests that need CUDA (they fail, not skip, when CUDA is missing).
test-gpu: $(STAMP)
	DISTNN_REQUIRE_GPU=1 $(BIN)/python -m pytest -q -m gpu

# On a GPU machine whose $(PYTHON) already has torch, accelerate, safetensors and pytest (no
# venv, nothing installed), in one call of under 10 minutes, each part cut off after its
# *_LIMIT seconds and run even if an earlier one failed (the limits add up to 580 s: under
# the 600 s one command may run, in a lent machine's 15 minutes with its start):
# 1. gpu-lm (below): the GPT-2-small language-model recipe, distnn against a nanoGPT-style
#    plain loop, tokens/s and MFU, distnn in a world of one over NCCL (never run on a GPU
#    yet: first, so that it is measured whatever the later parts do);
# 2. the CUDA tests, one at a time (several torchrun launches at once would contend for
#    its default port); each test cut off after 90 s where pytest-timeout is installed; the
#    bf16 language-model recipe's measured differences in OUT/lm-bf16.json;
# 3. kernel profiles of the step (python -m distnn.tools.profile): --cuda-graph --compile,
#    the hand-made floors (--floor, with and without --compile), bf16 --compile on the
#    compute-bound size, --cuda-graph --compile with cuBLASLt as torch's preferred BLAS (on
#    an H100: 14.1 kernels and 43.0 us of GPU time against 13.1 and 35.7) and, as an
#    experiment whose failure does not fail the target, with no cuBLAS workspace
#    (CUBLAS_WORKSPACE_CONFIG=:0:0: no room for split-K's partial sums, so no split-K
#    reductions; are the matmuls then slower than those 3 kernels?); the eager and
#    uncompiled profiles (measured in the ninth session) with PROFILE_ALL=1;
# 4. the benchmark on the GPU, with the hand-made CUDA graph floors distnn is set against
#    ("vs floors") and the weight gradient's layouts: no round starts past BENCH_BUDGET
#    seconds; each sample is logged as it is taken;
# 5. with OVERLAP=1 only (measured already: docs/results/bench-cpu16-overlap.md; it then
#    exceeds 600 s), the bucketed-overlap benchmark (the large and deep workloads: overlap,
#    and the bucket size sweep) on that machine's CPU cores, 2 gloo ranks of
#    OVERLAP_THREADS threads, leaving cores free for the communication.
# One log, OUT/gpu-check.log; OUT/bench-gpt.md and .json; OUT/lm-bf16.json; the bench files
# (bench.md, .json, .png, .samples-1.json): 8 files, what the lent machine returns at most
# (the overlap run's go to OUT/cpu-overlap). Fails if any part did. On an H100 (2026-11-27,
# ninth session) the tests, 8 profiles and 3 benchmark rounds took 420 s: 21 tests in 110 s
# (23 later: 139 s).
OUT ?= gpu-results
BENCH_ARGS ?=
GPU_TEST_LIMIT ?= 180
PROFILE_LIMIT ?= 100
PROFILE_ALL ?=
BENCH_BUDGET ?= 50
BENCH_LIMIT ?= 90
OVERLAP_BUDGET ?= 75
OVERLAP_LIMIT ?= 110
OVERLAP_THREADS ?= 4
OVERLAP ?=
COMPUTE_SIZE = --batch-size 8192 --d-in 4096 --hidden 4096 --d-out 4096 --lr 1e-9
gpu-check:
	mkdir -p $(OUT)
	set -o pipefail; failed=0; log=$(OUT)/gpu-check.log; \
	$(MAKE) --no-print-directory gpu-lm 2>&1 | tee -a $$log || failed=1; \
	per_test=$$(PYTHONPATH=. $(PYTHON) -c 'import pytest_timeout' 2>/dev/null \
	  && echo --timeout=90); \
	DISTNN_REQUIRE_GPU=1 DISTNN_GPU_OUT=$(OUT) PYTHONPATH=. PYTHONUNBUFFERED=1 \
	  timeout $(GPU_TEST_LIMIT) $(PYTHON) -m pytest -v --durations=0 $$per_test -m gpu \
	  tests/test_gpu.py 2>&1 | tee -a $$log || failed=1; \
	PYTHONPATH=. PYTHONUNBUFFERED=1 timeout $(PROFILE_LIMIT) bash -c 'status=0; \
	  for flags in $(if $(PROFILE_ALL),"" "--cuda-graph" "--compile") "--cuda-graph --compile" \
	      "--floor" "--floor --compile" "$(COMPUTE_SIZE) --steps 10 --precision bf16 --compile"; do \
	    $(PYTHON) -m distnn.tools.profile --steps 200 $$flags || status=1; done; \
	  TORCH_BLAS_PREFER_CUBLASLT=1 $(PYTHON) -m distnn.tools.profile --steps 200 --cuda-graph \
	    --compile || status=1; \
	  echo "experiment: no cuBLAS workspace, so no split-K reductions (may fail; not counted)"; \
	  CUBLAS_WORKSPACE_CONFIG=:0:0 $(PYTHON) -m distnn.tools.profile --steps 200 --cuda-graph \
	    --compile || true; exit $$status' \
	  2>&1 | tee -a $$log || failed=1; \
	PYTHONPATH=. PYTHONUNBUFFERED=1 timeout $(BENCH_LIMIT) $(PYTHON) -m distnn.tools.bench \
	  --out $(OUT) --budget-s $(BENCH_BUDGET) $(BENCH_ARGS) 2>&1 | tee -a $$log \
	  || failed=1; \
	if [ -n "$(OVERLAP)" ]; then mkdir -p $(OUT)/cpu-overlap; \
	  CUDA_VISIBLE_DEVICES= PYTHONPATH=. PYTHONUNBUFFERED=1 timeout $(OVERLAP_LIMIT) \
	  $(PYTHON) -m distnn.tools.bench --out $(OUT)/cpu-overlap --workloads large,deep --worlds 2 \
	  --compute-steps 5 --threads $(OVERLAP_THREADS) --budget-s $(OVERLAP_BUDGET) 2>&1 \
	  | tee -a $$log || failed=1; fi; \
	exit $$failed

# On a lent GPU machine, as gpu-check (PYTHON=python3 OUT=DIR, no venv; gpu-check runs it
# first): the GPT-2-small language-model recipe, distnn.fit against a nanoGPT-style plain
# loop (bf16 autocast, torch.compile, fused AdamW, cosine, clipping), tokens/s and MFU, in
# a world of one under torchrun (NCCL); OUT/bench-gpt.md, .json. Both variants compile
# first, untimed; the timed rounds stop at GPT_BUDGET seconds, and the report holds those
# done. Not yet run on a GPU: how long GPT-2 small takes to compile there is not known.
GPT_LIMIT ?= 210
GPT_BUDGET ?= 60
GPT_ARGS ?=
gpu-lm:
	mkdir -p $(OUT)
	PYTHONPATH=. PYTHONUNBUFFERED=1 timeout $(GPT_LIMIT) $(PYTHON) -m torch.distributed.run \
	  --standalone --nproc_per_node=1 -m distnn.tools.bench_gpt --out $(OUT)/bench-gpt \
	  --budget-s $(GPT_BUDGET) $(GPT_ARGS)

# distnn against the reference loop, DDP and Accelerate; then training from a data file
# against DDP + DistributedSampler (world sizes, file vs memory, memory); in bench-results/.
bench: $(STAMP)
	$(BIN)/python -m distnn.tools.bench --out bench-results
	$(BIN)/python -m distnn.tools.bench_data --out bench-results/data

lint: $(STAMP)
	$(BIN)/ruff check distnn tests

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
