# Kiln: `make run` starts the whole service on the embedded default; `make test` runs the suite.
# Each target creates .venv and installs requirements.txt when missing or changed.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-fast test-gpu bench install clean

$(STAMP): requirements.txt pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) on PATH"; exit 1; }
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "Installing Kiln's Python packages into $(VENV) (PyTorch with CUDA is several GB:"
	@echo "this takes minutes on a real network, once; later runs start at once)..."
	set -o pipefail; $(BIN)/pip install --disable-pip-version-check --progress-bar off -r requirements.txt \
		| { grep -E '^(Collecting|Successfully installed)' || true; }
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)
	@echo "Installed. Commands: $(BIN)/kiln (CLI), $(BIN)/flask --app web tokens (tokens)."

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m worker.embedded

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not integration and not browser" $(PYTEST_ARGS)

# The CUDA paths (AMP, pinned memory, channels_last, NCCL ranks, /predict on GPU, throughput): SKIP without CUDA.
test-gpu: $(STAMP)
	$(BIN)/python bench/gpu_check.py $(GPU_CHECK_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/train_overhead.py
	$(BIN)/python bench/job_overhead.py
	$(BIN)/python bench/serve.py

clean:
	rm -rf var .pytest_cache
