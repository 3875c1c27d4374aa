# Two commands for a fresh machine (Python 3.11+): `make up` runs Conveyor, `make test` runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: up test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

up: $(BIN)/python
	$(BIN)/pip install --quiet -e .
	$(BIN)/conveyor up

test: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

bench: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/python benchmarks/pipeline.py

clean:
	rm -rf $(VENV) .conveyor .mypy_cache .ruff_cache .pytest_cache
