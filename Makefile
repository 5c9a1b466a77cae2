# Two entry points (see README): `make demo` and `make test`. Both set everything up first
# and are fast the second time (stamps, cached model/data/router).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install setup demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

# Torch is pinned to the CPU build that lies on this machine's disk, before anything else can
# pull a multi-GB CUDA build as a transitive dependency.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

setup: install
	$(BIN)/dlp setup

demo: setup
	$(BIN)/dlp demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -x --timeout=900 tests

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
