# Kiln: `make run` starts the whole service on the embedded default; `make test` runs the suite.
# Each target creates .venv and installs requirements.txt when missing or changed.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-fast bench install clean

$(STAMP): requirements.txt pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) on PATH"; exit 1; }
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m worker.embedded

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not integration and not browser" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/train_overhead.py
	$(BIN)/python bench/job_overhead.py
	$(BIN)/python bench/serve.py

clean:
	rm -rf var .pytest_cache
