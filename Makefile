# Two entry points: `make demo` (set up + run the demo) and `make test` (set up + run the tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned to the builds this project is tested with (they lie on the CI disk).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test clean

$(BIN)/cxrnn: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(BIN)/cxrnn

setup: $(BIN)/cxrnn

demo: setup
	$(BIN)/cxrnn demo --out runs/demo

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
