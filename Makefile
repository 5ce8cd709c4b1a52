# `make train` and `make test` set up .venv/ from requirements.txt on first use, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Empty NPROC: the script's default, one process per GPU, or 2 single-process EDiT replicas on a machine without GPUs.
NPROC ?=
DP_MODE ?= edit

.PHONY: train test test-fast bench gpu-check clean-venv

$(VENV)/installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

train: $(VENV)/installed
	NPROC=$(NPROC) DP_MODE=$(DP_MODE) bash examples/pretrain_edit.sh $(ARGS)

test: $(VENV)/installed
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

# The inner loop (under a minute on 2 cores): every test that runs in the test process itself, none that starts processes.
test-fast: $(VENV)/installed
	$(PY) -m pytest -q -m "not slow" tests $(PYTEST_ARGS)

bench: $(VENV)/installed
	$(PY) tools/bench_throughput.py $(ARGS)

# On a machine with one CUDA device (refused in one line elsewhere): NCCL step, ~1B throughput/MFU, swapping, EDiT.
gpu-check: $(VENV)/installed
	PYTHON=$(PY) bash tools/gpu_check.sh

clean-venv:
	rm -rf $(VENV)
