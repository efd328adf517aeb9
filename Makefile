# The two commands a newcomer runs:
#   make demo   the main job: EPS vs the CAM baseline end to end on the synthetic dataset
#               (data, shards, two-rank deepspeed training, pseudo-masks, segmentation; one
#               table at the end; minutes on 2 CPU cores). DEMO_ARGS="--seed 1" passes options.
#   make test   the test suite
# make bench runs the EPS-loss kernel microbenchmark on whatever device is here.
# make gpu-check, on a machine with one GPU: correctness of the GPU path and every speed goal
#               in <= 5 minutes (verdict + a table for BENCHMARKS.md; runs/gpu-check.json).
#               GPU_CHECK_ARGS="--budget-s 480" passes options; --smoke runs it on a CPU.
# Both bootstrap a virtual environment in $(VENV) from nothing; when it already exists and
# setup.py / constraints.txt did not change, the environment is left alone.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.epsdist-installed
PYTEST_ARGS ?=
DEMO_ARGS ?=
GPU_CHECK_ARGS ?=

.PHONY: demo test test-all bench gpu-check env clean-env

env: $(STAMP)

$(STAMP): setup.py constraints.txt
	@# a new environment takes ~6 GiB (torch with its CUDA libraries): say so before pip fails
	@test -x $(PY) || { dir=$$(dirname $(VENV)); \
	  free=$$(df -Pk "$$dir" 2>/dev/null | awk 'NR==2 {print int($$4 / 1048576)}'); \
	  test -z "$$free" || test "$$free" -ge 8 || { echo "make env: a new $(VENV) needs about" \
	    "7 GiB of disk; only $$free GiB free in $$dir" >&2; exit 1; }; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	# torch first: deepspeed's build needs it, and this pins the verified CUDA build
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m epsdist.demo --out runs/demo $(DEMO_ARGS)

bench: $(STAMP)
	$(PY) -m epsdist_kernels.bench

gpu-check: $(STAMP)
	$(PY) -m epsdist.gpucheck --json runs/gpu-check.json $(GPU_CHECK_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# includes the tests marked slow (end-to-end runs)
test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS) tests

clean-env:
	rm -rf $(VENV)
